package sandbox

import (
	"context"
	"net"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func init() {
	// As in the agent (cmd/caisson-agent): the main goroutine keeps the main thread, so
	// that no thread entering a pod's namespace is the main one, which the Go runtime
	// cannot discard and /proc/self/ns names.
	runtime.LockOSThread()
}

// nsInode is the inode of the namespace file at path (which namespace it is).
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func hostnameIn(t *testing.T, utsPath string) string {
	t.Helper()
	var u unix.Utsname
	if err := inNamespace(utsPath, unix.CLONE_NEWUTS, func() error { return unix.Uname(&u) }); err != nil {
		t.Fatal(err)
	}
	return unix.ByteSliceToString(u.Nodename[:])
}

// loopbackIsUp reports whether lo is up in the network namespace pinned at path.
func loopbackIsUp(t *testing.T, path string) bool {
	t.Helper()
	lo, err := netlinkIn(t, path).LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	return lo.Attrs().Flags&net.FlagUp != 0
}

// pinned reports whether a namespace is pinned at path.
func pinned(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.NSFS_MAGIC
}

func TestPrepare(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	s := New(filepath.Join(t.TempDir(), "sandbox"))
	t.Cleanup(func() { s.Destroy(ctx) })

	agent := map[string]uint64{}
	for _, ns := range podNamespaces {
		agent[ns.name] = nsInode(t, "/proc/self/ns/"+ns.name)
	}
	if err := s.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	prepared := map[string]uint64{}
	for _, ns := range podNamespaces {
		prepared[ns.name] = nsInode(t, s.nsPath(ns.name))
		if prepared[ns.name] == agent[ns.name] {
			t.Errorf("the prepared %s namespace is the agent's", ns.name)
		}
	}
	if !loopbackIsUp(t, s.nsPath("net")) {
		t.Error("lo is down in the prepared network namespace")
	}
	if err := s.Prepare(ctx); err != nil { // again: nothing changes
		t.Fatal(err)
	}
	if n := nsInode(t, s.nsPath("net")); n != prepared["net"] {
		t.Errorf("a second Prepare replaced the network namespace")
	}

	// Create takes the prepared namespaces and names the host.
	if err := s.Create(ctx, Config{ID: "pod", Hostname: "pod-host"}); err != nil {
		t.Fatal(err)
	}
	for name, ino := range prepared {
		if n := nsInode(t, s.nsPath(name)); n != ino {
			t.Errorf("Create made a new %s namespace instead of the prepared one", name)
		}
	}
	if h := hostnameIn(t, s.nsPath("uts")); h != "pod-host" {
		t.Errorf("hostname in the pod's UTS namespace %q, want pod-host", h)
	}
	if err := s.Prepare(ctx); err != nil { // after Create: nothing changes
		t.Fatal(err)
	}
	if n := nsInode(t, s.nsPath("uts")); n != prepared["uts"] || hostnameIn(t, s.nsPath("uts")) != "pod-host" {
		t.Error("Prepare after Create changed the pod's UTS namespace")
	}

	// Destroy unpins them; a failed Create of a prepared sandbox does too.
	s.Destroy(ctx)
	if pinned(s.nsPath("net")) {
		t.Error("the network namespace is still pinned after Destroy")
	}
	if err := s.Prepare(ctx); err != nil {
		t.Fatal(err)
	}
	bad := Config{ID: "pod", Sysctls: map[string]string{"net.no.such.sysctl": "1"}}
	if err := s.Create(ctx, bad); err == nil {
		t.Fatal("Create with an unknown sysctl succeeded")
	}
	if pinned(s.nsPath("net")) {
		t.Error("the prepared network namespace is still pinned after a failed Create")
	}
	if err := s.Create(ctx, Config{ID: "pod"}); err != nil {
		t.Fatalf("Create after a failed one: %v", err)
	}
}

// netlinkIn returns a netlink handle in the network namespace pinned at path, closed
// when the test ends.
func netlinkIn(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}
