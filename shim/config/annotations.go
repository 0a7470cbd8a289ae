package config

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// AnnotationPrefix starts the pod annotations that override configuration
// keys, e.g. "io.caisson.config.hypervisor.vcpus": "2".
const AnnotationPrefix = "io.caisson.config."

// overrides are the keys a pod may ever override; PodAnnotations picks which
// of them this host allows. Paths and the accelerator are deliberately absent:
// a pod must not choose what the host runs.
var overrides = map[string]func(*Config, string) error{
	"hypervisor.vcpus": func(c *Config, v string) error {
		n, err := strconv.Atoi(v)
		c.Hypervisor.VCPUs = n
		return err
	},
	"hypervisor.memory_mib": func(c *Config, v string) error {
		n, err := strconv.Atoi(v)
		c.Hypervisor.MemoryMiB = n
		return err
	},
	"storage.dax": func(c *Config, v string) error {
		b, err := strconv.ParseBool(v)
		c.Storage.DAX = b
		return err
	},
	"guest.debug_console": func(c *Config, v string) error {
		b, err := strconv.ParseBool(v)
		c.Guest.DebugConsole = b
		return err
	},
}

func overrideKeys() []string {
	keys := make([]string, 0, len(overrides))
	for k := range overrides {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// WithAnnotations returns c with the pod's allowed overrides applied. An
// override annotation for a key the host does not allow, or with a bad value,
// is an InvalidArgument error that names it.
func (c Config) WithAnnotations(annotations map[string]string) (Config, error) {
	keys := make([]string, 0)
	for a := range annotations {
		if strings.HasPrefix(a, AnnotationPrefix) {
			keys = append(keys, a)
		}
	}
	slices.Sort(keys)
	out := c
	out.PodAnnotations = slices.Clone(c.PodAnnotations)
	for _, a := range keys {
		key := strings.TrimPrefix(a, AnnotationPrefix)
		if !slices.Contains(c.PodAnnotations, key) {
			return Config{}, fmt.Errorf("annotation %s: key %q is not in this host's pod_annotations %v: %w",
				a, key, c.PodAnnotations, errdefs.ErrInvalidArgument)
		}
		if err := overrides[key](&out, annotations[a]); err != nil {
			return Config{}, fmt.Errorf("annotation %s=%q: %v: %w", a, annotations[a], err, errdefs.ErrInvalidArgument)
		}
		if err := out.checkLimits(); err != nil {
			return Config{}, fmt.Errorf("annotation %s=%q: %w", a, annotations[a], err)
		}
	}
	if err := out.Validate(); err != nil {
		return Config{}, fmt.Errorf("after pod annotations: %w", err)
	}
	return out, nil
}

// checkLimits says which of the VM's size limits c exceeds, naming it.
func (c Config) checkLimits() error {
	h := c.Hypervisor
	switch {
	case h.VCPUs > h.MaxVCPUs:
		return fmt.Errorf("%d vCPUs, above this host's hypervisor.max_vcpus = %d: %w", h.VCPUs, h.MaxVCPUs, errdefs.ErrInvalidArgument)
	case h.MemoryMiB > h.MaxMemoryMiB:
		return fmt.Errorf("%d MiB of memory, above this host's hypervisor.max_memory_mib = %d: %w", h.MemoryMiB, h.MaxMemoryMiB, errdefs.ErrInvalidArgument)
	}
	return nil
}

// WithPodResources returns c with the VM grown by what the pod itself asks for besides
// the guest's own needs (the CRI's sandbox memory and CPU annotations), which source
// names in errors. A VM that would exceed hypervisor.max_vcpus or max_memory_mib is an
// InvalidArgument error naming source and the limit.
func (c Config) WithPodResources(source string, memoryMiB, vcpus int) (Config, error) {
	if memoryMiB < 0 || vcpus < 0 {
		return Config{}, fmt.Errorf("%s: negative resources: %w", source, errdefs.ErrInvalidArgument)
	}
	out := c
	out.Hypervisor.MemoryMiB += memoryMiB
	out.Hypervisor.VCPUs += vcpus
	if err := out.checkLimits(); err != nil {
		return Config{}, fmt.Errorf("pod resources %s make the VM too large: %w", source, err)
	}
	return out, nil
}
