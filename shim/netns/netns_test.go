package netns

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// gone waits for pid to exit (or become a zombie of someone else).
func gone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil || strings.Contains(string(st), ") Z ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("holder %d still runs", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestNew(t *testing.T) {
	testutil.RequireRoot(t)
	n, err := New()
	if err != nil {
		t.Fatal(err)
	}
	pid := n.Pid()
	if inode(t, n.Path()) == inode(t, "/proc/self/ns/net") {
		t.Fatal("the holder is in the test's network namespace")
	}
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if string(cmdline) != holderName+"\x00" {
		t.Errorf("holder's command line %q", cmdline)
	}
	h, err := vnetns.GetFromPath(n.Path())
	if err != nil {
		t.Fatal(err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	links, err := nl.LinkList()
	nl.Close()
	h.Close()
	if err != nil {
		t.Fatal(err)
	}
	if len(links) != 1 || links[0].Attrs().Name != "lo" || links[0].Attrs().Flags&net.FlagUp == 0 {
		t.Fatalf("links in the new namespace: %v, want lo, up", links)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	gone(t, pid)
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestJoin(t *testing.T) {
	testutil.RequireRoot(t)
	owner, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer owner.Close()
	n, err := Join(owner.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if inode(t, n.Path()) != inode(t, owner.Path()) {
		t.Fatal("the joining holder is not in the namespace it joined")
	}
	// The thread that forked it went back: the test is still in its own namespace.
	if inode(t, "/proc/self/ns/net") == inode(t, owner.Path()) {
		t.Fatal("the test process was left in the joined namespace")
	}
	if _, err := Join("/nonexistent/netns"); err == nil {
		t.Fatal("Join of a missing path succeeded")
	}
}

// A holder exits when its shim dies (its stdin's write end closes with the shim).
func TestHolderEndsWithItsParent(t *testing.T) {
	testutil.RequireRoot(t)
	if os.Getenv("NETNS_TEST_PARENT") == "1" {
		n, err := New()
		if err != nil {
			os.Exit(2)
		}
		os.Stdout.WriteString(strconv.Itoa(n.Pid()) + "\n")
		time.Sleep(time.Hour) // killed by the test
		return
	}
	cmd := exec.Command("/proc/self/exe", "-test.run", "^TestHolderEndsWithItsParent$")
	cmd.Env = append(os.Environ(), "NETNS_TEST_PARENT=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 32)
	k, _ := out.Read(buf)
	pid, err := strconv.Atoi(strings.TrimSpace(string(buf[:k])))
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child printed %q", buf[:k])
	}
	cmd.Process.Kill()
	cmd.Wait()
	gone(t, pid)
}
