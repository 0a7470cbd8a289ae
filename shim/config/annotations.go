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
	}
	if err := out.Validate(); err != nil {
		return Config{}, fmt.Errorf("after pod annotations: %w", err)
	}
	return out, nil
}
