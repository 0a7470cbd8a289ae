package integration

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	exec "k8s.io/client-go/util/exec"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// stream runs the CRI streaming session at rawURL as kubectl does (SPDY).
func stream(ctx context.Context, t *testing.T, rawURL string, o remotecommand.StreamOptions) error {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	ex, err := remotecommand.NewSPDYExecutor(&rest.Config{}, "POST", u)
	if err != nil {
		t.Fatal(err)
	}
	return ex.StreamWithContext(ctx, o)
}

// waitWriter is an io.Writer that closes seen once the written bytes contain want.
type waitWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	want string
	seen chan struct{}
	once sync.Once
}

func (w *waitWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if strings.Contains(w.buf.String(), w.want) {
		w.once.Do(func() { close(w.seen) })
	}
	return len(p), nil
}

func (w *waitWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// TestCRIStreamingExecAndAttach: the kubelet's streaming Exec (stdin, stdout, stderr, exit
// code; and with a TTY) and Attach to a running container's stdin and stdout, through
// containerd's streaming server into the VM.
func TestCRIStreamingExecAndAttach(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	podCfg := c.PodConfig("stream", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	catCfg := harness.ContainerConfig("cat", image, "cat")
	catCfg.Stdin = true
	cat := c.StartContainer(t, pod, podCfg, catCfg)

	// Exec with stdin, separate stdout and stderr, and an exit code.
	resp, err := c.Runtime.Exec(ctx, &runtime.ExecRequest{
		ContainerId: cat, Cmd: []string{"sh", "-c", "read x; echo out-$x; echo err-$x >&2; exit 3"},
		Stdin: true, Stdout: true, Stderr: true,
	})
	if err != nil {
		t.Fatalf("Exec: %v", err)
	}
	var stdout, stderr bytes.Buffer
	err = stream(ctx, t, resp.Url, remotecommand.StreamOptions{Stdin: strings.NewReader("hi\n"), Stdout: &stdout, Stderr: &stderr})
	var code exec.CodeExitError
	if !errors.As(err, &code) || code.Code != 3 {
		t.Fatalf("streaming exec ended with %v, want exit code 3", err)
	}
	if stdout.String() != "out-hi\n" || stderr.String() != "err-hi\n" {
		t.Fatalf("streaming exec: stdout %q stderr %q, want out-hi and err-hi", stdout.String(), stderr.String())
	}

	// Exec with a TTY: the process sees a terminal.
	resp, err = c.Runtime.Exec(ctx, &runtime.ExecRequest{ContainerId: cat, Cmd: []string{"tty"}, Tty: true, Stdout: true})
	if err != nil {
		t.Fatalf("Exec with tty: %v", err)
	}
	stdout.Reset()
	if err := stream(ctx, t, resp.Url, remotecommand.StreamOptions{Stdout: &stdout, Tty: true}); err != nil {
		t.Fatalf("streaming exec with tty: %v (%q)", err, stdout.String())
	}
	if !strings.HasPrefix(strings.TrimSpace(stdout.String()), "/dev/pts/") {
		t.Fatalf("tty in a TTY exec = %q, want /dev/pts/N", stdout.String())
	}

	// Attach: what goes to the container's stdin comes back from cat on its stdout.
	aresp, err := c.Runtime.Attach(ctx, &runtime.AttachRequest{ContainerId: cat, Stdin: true, Stdout: true, Stderr: true})
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	out := &waitWriter{want: "attached-line", seen: make(chan struct{})}
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- stream(actx, t, aresp.Url, remotecommand.StreamOptions{Stdin: pr, Stdout: out, Stderr: io.Discard})
	}()
	pw.Write([]byte("attached-line\n"))
	select {
	case <-out.seen:
	case err := <-done:
		t.Fatalf("attach ended before the echo: %v (stdout %q)", err, out.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("attach: cat's echo never came back (stdout %q)", out.String())
	}
	cancel()
	pw.Close()
	<-done

	// The container's log has what cat echoed.
	logs := readCRILog(t, podCfg.LogDirectory+"/cat.log")
	if logs["attached-line"] != "stdout" {
		t.Errorf("cat.log = %v, want attached-line on stdout", logs)
	}
	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}
