// Package podid decides which pod a container belongs to, the runtime configuration
// that pod runs with and where its state lives. The shim manager (which shim, and so
// which VM, a container goes to; what `shim delete` cleans up) and the task service
// (the pod it starts) ask it both, so they cannot disagree.
package podid

import (
	"crypto/sha256"
	"fmt"
	"path/filepath"

	"github.com/caisson-containers/caisson/shim/config"
)

// Annotations that put containers in one pod (one shim, one VM), the first set wins:
// a group named by the user (`nerdctl run --annotation io.caisson.group=...`), then a
// CRI container's sandbox (containerd's CRI sets it on the sandbox container too, to
// its own id).
const (
	GroupAnnotation     = "io.caisson.group"
	SandboxIDAnnotation = "io.kubernetes.cri.sandbox-id"
)

// Pod is what a container's pod is.
type Pod struct {
	// ID names the pod: its group, its CRI sandbox's id, or the container's own id
	// for a container alone in its pod.
	ID string
	// Config is the runtime configuration the pod runs with, before the pod's
	// annotations and resources adjust it (those change no path).
	Config config.Config
	// ConfigFile is the file Config came from, "" for the defaults.
	ConfigFile string
	// StateDir is where the pod's VM keeps its sockets and logs, below Config.StateDir.
	StateDir string
}

// Of is the pod of container id in namespace ns, whose spec has annotations, run with
// the configuration file configPath (the ConfigPath runtime option), or config.Load's
// default when configPath is "".
func Of(ns, id string, annotations map[string]string, configPath string) (Pod, error) {
	cfg, file, err := config.Load(configPath)
	if err != nil {
		return Pod{}, err
	}
	p := WithConfig(ns, id, annotations, cfg)
	p.ConfigFile = file
	return p, nil
}

// WithConfig is the pod of container id in namespace ns, whose spec has annotations,
// run with cfg.
func WithConfig(ns, id string, annotations map[string]string, cfg config.Config) Pod {
	pid := ID(id, annotations)
	return Pod{ID: pid, Config: cfg, StateDir: StateDir(cfg.StateDir, ns, pid)}
}

// ID is the id of the pod container id, whose spec has annotations, belongs to.
func ID(id string, annotations map[string]string) string {
	for _, a := range []string{GroupAnnotation, SandboxIDAnnotation} {
		if g := annotations[a]; g != "" {
			return g
		}
	}
	return id
}

// StateDir is where the pod id of namespace ns keeps its VM's state under root. Unix
// socket paths are limited to 107 bytes and CRI ids are 64 characters, so a long id
// is shortened, keeping a hash of all of it (config.MaxStateDirLen counts on at most
// 38 bytes here).
func StateDir(root, ns, id string) string {
	name := ns + "-" + id
	if len(name) > 32 {
		h := sha256.Sum256([]byte(ns + "/" + id))
		name = fmt.Sprintf("%.12s-%.12s-%x", ns, id, h[:6])
	}
	return filepath.Join(root, name)
}
