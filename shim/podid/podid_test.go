package podid

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
)

func TestWithConfig(t *testing.T) {
	cfg := config.Default("/usr/share/caisson")
	cfg.StateDir = "/run/caisson"
	long := strings.Repeat("0123456789abcdef", 4) // a CRI id
	for _, tc := range []struct {
		name        string
		ns, id      string
		annotations map[string]string
		wantID      string
		wantDir     string
	}{
		{
			name: "CRI sandbox", ns: "k8s.io", id: "sb1",
			annotations: map[string]string{"io.kubernetes.cri.container-type": "sandbox", SandboxIDAnnotation: "sb1"},
			wantID:      "sb1", wantDir: "/run/caisson/k8s.io-sb1",
		},
		{
			name: "CRI container", ns: "k8s.io", id: "c1",
			annotations: map[string]string{"io.kubernetes.cri.container-type": "container", SandboxIDAnnotation: "sb1"},
			wantID:      "sb1", wantDir: "/run/caisson/k8s.io-sb1",
		},
		{
			name: "group", ns: "default", id: "web",
			annotations: map[string]string{GroupAnnotation: "shop"},
			wantID:      "shop", wantDir: "/run/caisson/default-shop",
		},
		{
			// The shim manager put the container in the group's shim: its pod is the group's.
			name: "group before the CRI sandbox", ns: "k8s.io", id: "c1",
			annotations: map[string]string{GroupAnnotation: "shop", SandboxIDAnnotation: "sb1"},
			wantID:      "shop", wantDir: "/run/caisson/k8s.io-shop",
		},
		{
			name: "lone container", ns: "default", id: "web",
			wantID: "web", wantDir: "/run/caisson/default-web",
		},
		{
			name: "empty annotations", ns: "default", id: "web",
			annotations: map[string]string{GroupAnnotation: "", SandboxIDAnnotation: ""},
			wantID:      "web", wantDir: "/run/caisson/default-web",
		},
		{
			name: "long id", ns: "k8s.io", id: long,
			// The name pod directories have always had: pods started by an older shim are found.
			wantID: long, wantDir: "/run/caisson/k8s.io-0123456789ab-e4a140e2c0f0",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := WithConfig(tc.ns, tc.id, tc.annotations, cfg)
			if p.ID != tc.wantID {
				t.Errorf("ID = %q, want %q", p.ID, tc.wantID)
			}
			if p.StateDir != tc.wantDir {
				t.Errorf("StateDir = %q, want %q", p.StateDir, tc.wantDir)
			}
			if p.Config.StateDir != cfg.StateDir {
				t.Errorf("Config.StateDir = %q, want %q", p.Config.StateDir, cfg.StateDir)
			}
		})
	}
}

// Long ids are shortened so that the VM's sockets fit a unix socket path, and ids that
// differ anywhere get different directories.
func TestStateDirLongIDs(t *testing.T) {
	a := strings.Repeat("a", 63) + "1"
	b := strings.Repeat("a", 63) + "2"
	da, db := StateDir("/run/caisson", "k8s.io", a), StateDir("/run/caisson", "k8s.io", b)
	if da == db {
		t.Fatalf("ids that differ only at the end share %s", da)
	}
	if StateDir("/run/caisson", "k8s.io", a) != da {
		t.Fatal("not stable")
	}
	if !strings.HasPrefix(filepath.Base(da), "k8s.io-aaaaaaaaaaaa-") {
		t.Fatalf("shortened name keeps no readable prefix: %s", da)
	}
	// The longest name, below the longest state_dir, leaves room for the VM's sockets:
	// config.MaxStateDirLen counts on it.
	root := "/" + strings.Repeat("r", config.MaxStateDirLen-1)
	d := StateDir(root, strings.Repeat("n", 76), strings.Repeat("0123456789abcdef", 4))
	if sock := filepath.Join(d, "vm", "agent.sock"); len(sock) > 107 {
		t.Fatalf("socket path %s is %d bytes, over 107", sock, len(sock))
	}
}

// Of honours the configuration file it is given, and loads the default one without.
func TestOfConfig(t *testing.T) {
	stateRoot := filepath.Join(testutil.ShortTempDir(t), "state")
	cfgPath := filepath.Join(t.TempDir(), "caisson.toml")
	if err := os.WriteFile(cfgPath, []byte("state_dir = \""+stateRoot+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ann := map[string]string{SandboxIDAnnotation: "sb1"}

	p, err := Of("k8s.io", "c1", ann, cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if p.ConfigFile != cfgPath || p.Config.StateDir != stateRoot || p.StateDir != filepath.Join(stateRoot, "k8s.io-sb1") {
		t.Errorf("with ConfigPath: file %q, state_dir %q, pod state %q", p.ConfigFile, p.Config.StateDir, p.StateDir)
	}

	def, file, err := config.Load("")
	if err != nil {
		t.Skipf("the default configuration does not load here: %v", err)
	}
	p, err = Of("k8s.io", "c1", ann, "")
	if err != nil {
		t.Fatal(err)
	}
	if p.ConfigFile != file || p.StateDir != filepath.Join(def.StateDir, "k8s.io-sb1") {
		t.Errorf("without ConfigPath: file %q, pod state %q; want %q below %q", p.ConfigFile, p.StateDir, file, def.StateDir)
	}

	bad := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(bad, []byte("state_dir = \"relative\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Of("k8s.io", "c1", ann, bad); err == nil || !strings.Contains(err.Error(), "state_dir") {
		t.Errorf("a bad configuration: %v, want an error naming state_dir", err)
	}
	if _, err := Of("k8s.io", "c1", ann, filepath.Join(t.TempDir(), "missing.toml")); err == nil {
		t.Error("a missing configuration file named by ConfigPath loads")
	}
}
