package pod

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestStateDir(t *testing.T) {
	if got := StateDir("/run/caisson", "default", "web"); got != "/run/caisson/default-web" {
		t.Fatalf("a short id keeps its name: %s", got)
	}
	a := strings.Repeat("a", 63) + "1"
	b := strings.Repeat("a", 63) + "2"
	da, db := StateDir("/run/caisson", "k8s.io", a), StateDir("/run/caisson", "k8s.io", b)
	if da == db {
		t.Fatalf("ids that differ only at the end share %s", da)
	}
	if StateDir("/run/caisson", "k8s.io", a) != da {
		t.Fatal("not stable")
	}
	// The longest socket the VM keeps there must fit a unix socket path (107 bytes).
	if sock := filepath.Join(da, "vm", "agent.sock"); len(sock) > 80 {
		t.Fatalf("socket path %s is %d bytes", sock, len(sock))
	}
	if !strings.HasPrefix(filepath.Base(da), "k8s.io-aaaaaaaaaaaa-") {
		t.Fatalf("shortened name keeps no readable prefix: %s", da)
	}
}
