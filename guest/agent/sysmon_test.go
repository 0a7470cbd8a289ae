package agent

import (
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestSysmonThreadFake(t *testing.T) {
	for _, tc := range []struct {
		name    string
		tids    []string
		pid     int
		want    int
		wantErr bool
	}{
		{name: "lowest after the main thread", tids: []string{"1", "80", "78", "79", "355"}, pid: 1, want: 78},
		{name: "main thread not the lowest", tids: []string{"200", "150", "201"}, pid: 200, want: 150},
		{name: "not a number", tids: []string{"1", "x", "9"}, pid: 1, want: 9},
		{name: "main thread alone", tids: []string{"1"}, pid: 1, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, n := range tc.tids {
				if err := os.Mkdir(filepath.Join(dir, n), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			got, err := sysmonThread(dir, tc.pid)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("sysmonThread = %d, %v; want %d, error %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
	if _, err := sysmonThread(filepath.Join(t.TempDir(), "none"), 1); err == nil {
		t.Error("no task directory: no error")
	}
}

// In a real Go process (this test's), the thread sysmonThread names is sysmon: while a
// goroutine keeps the process busy, it is the thread that sleeps in nanosleep (sysmon's
// usleep; the runtime's idle threads wait in futex or epoll_wait). Then slowSysmon gives
// it the slack and no other thread.
func TestSysmonThread(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root (CAP_SYS_NICE) to set another thread's timer slack")
	}
	tid, err := sysmonThread("/proc/self/task", os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
				os.Getpid()
			}
		}
	}()
	syscallFile := filepath.Join("/proc/self/task", strconv.Itoa(tid), "syscall")
	if runtime.GOARCH != "amd64" {
		t.Skip("looks for x86-64's nanosleep")
	}
	const sysNanosleep = "35 "
	seen := false
	for i := 0; i < 10000 && !seen; i++ {
		b, err := os.ReadFile(syscallFile)
		if err != nil {
			t.Fatal(err)
		}
		seen = strings.HasPrefix(string(b), sysNanosleep)
		time.Sleep(100 * time.Microsecond)
	}
	if !seen {
		t.Fatalf("thread %d never seen in nanosleep: not sysmon", tid)
	}

	if err := slowSysmon(); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "timerslack_ns"))
		if err != nil {
			t.Fatal(err)
		}
		want := strconv.Itoa(DefaultTimerSlack)
		if e.Name() == strconv.Itoa(tid) {
			want = strconv.FormatInt(sysmonTimerSlack.Nanoseconds(), 10)
		}
		if got := strings.TrimSpace(string(b)); got != want {
			t.Errorf("thread %s: timer slack %s, want %s", e.Name(), got, want)
		}
	}
}
