package launch

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/protobuf/proto"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/typeurl/v2"
)

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want invocation
	}{
		{
			name: "containerd 1.7 start",
			args: []string{"-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock", "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"},
			want: invocation{id: "abc", namespace: "k8s.io", address: "/run/containerd/containerd.sock", debug: true, action: "start"},
		},
		{
			name: "delete with a bundle",
			args: []string{"-namespace", "default", "-address", "/c.sock", "-publish-binary", "", "-id", "x", "-bundle", "/b", "delete"},
			want: invocation{id: "x", namespace: "default", address: "/c.sock", action: "delete"},
		},
		{
			name: "the long-running server",
			args: []string{"-namespace", "default", "-id", "x", "-address", "/c.sock"},
			want: invocation{id: "x", namespace: "default", address: "/c.sock"},
		},
		{name: "info", args: []string{"-info"}, want: invocation{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseArgs(tc.args)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("parseArgs = %+v, want %+v", got, tc.want)
			}
		})
	}
	if _, err := parseArgs([]string{"-no-such-flag", "start"}); err == nil {
		t.Error("an unknown flag parsed")
	}
}

func TestIsBootstrap(t *testing.T) {
	params, err := proto.Marshal(&bootapi.BootstrapParams{InstanceID: "abc", Namespace: "k8s.io", ContainerdGrpcAddress: "/c.sock"})
	if err != nil {
		t.Fatal(err)
	}
	// What containerd 1.7–2.2 write on a start's stdin: the runtime options.
	opts, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigPath: "/etc/caisson/config.toml"})
	if err != nil {
		t.Fatal(err)
	}
	legacy, err := proto.Marshal(opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		input []byte
		id    string
		want  bool
	}{
		{"bootstrap params", params, "abc", true},
		{"bootstrap params of another instance", params, "other", false},
		{"legacy runtime options", legacy, "abc", false},
		{"no input (legacy, no options)", nil, "abc", false},
		{"junk", []byte{0xff, 0xff, 0xff}, "abc", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := IsBootstrap(tc.input, tc.id, "k8s.io"); got != tc.want {
				t.Errorf("IsBootstrap = %v, want %v", got, tc.want)
			}
		})
	}
}

// fakeShim records the parameters of its Start.
type fakeShim struct {
	params *bootapi.BootstrapParams
	err    error
}

func (f *fakeShim) Name() string { return "io.containerd.fake.v2" }
func (f *fakeShim) Start(_ context.Context, p *bootapi.BootstrapParams) (*bootapi.BootstrapResult, error) {
	f.params = p
	if f.err != nil {
		return nil, f.err
	}
	return &bootapi.BootstrapResult{Version: 3, Address: "unix:///run/containerd/s/abc", Protocol: "ttrpc"}, nil
}
func (f *fakeShim) Stop(context.Context, string) (shim.StopStatus, error) {
	return shim.StopStatus{}, nil
}
func (f *fakeShim) Info(context.Context, io.Reader) (*types.RuntimeInfo, error) {
	return &types.RuntimeInfo{}, nil
}

func TestLegacyStart(t *testing.T) {
	t.Chdir(t.TempDir()) // no "log" FIFO here: start logs are discarded
	env := map[string]string{"TTRPC_ADDRESS": "/c.sock.ttrpc", "GRPC_ADDRESS": "/env.sock"}
	f := &fakeShim{}
	out, err := legacyStart(context.Background(), f, invocation{id: "abc", namespace: "k8s.io", address: "/c.sock", debug: true, action: "start"},
		nil, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	var res legacyResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("answer %q is not JSON: %v", out, err)
	}
	// containerd 1.7 refuses any version above 2.
	if res != (legacyResult{Version: 2, Address: "unix:///run/containerd/s/abc", Protocol: "ttrpc"}) {
		t.Errorf("answer = %+v", res)
	}
	p := f.params
	if p.InstanceID != "abc" || p.Namespace != "k8s.io" || p.ContainerdGrpcAddress != "/c.sock" ||
		p.ContainerdTtrpcAddress != "/c.sock.ttrpc" || p.LogLevel != bootapi.LogLevel_LOG_LEVEL_DEBUG || p.SocketDir != nil || len(p.Extensions) != 0 {
		t.Errorf("Start got %+v", p)
	}

	// The address flag is optional: GRPC_ADDRESS carries it too. Runtime options on
	// stdin reach Start as containerd 2.4 sends them, as an extension.
	opts, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigPath: "/etc/caisson/pod.toml"})
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := proto.Marshal(opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := legacyStart(context.Background(), f, invocation{id: "abc", namespace: "k8s.io", action: "start"},
		stdin, func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	if f.params.ContainerdGrpcAddress != "/env.sock" || f.params.LogLevel != bootapi.LogLevel_LOG_LEVEL_INFO {
		t.Errorf("Start got %+v", f.params)
	}
	var got runtimeoptions.Options
	if ok, err := f.params.FindExtension(&got); !ok || err != nil || got.ConfigPath != "/etc/caisson/pod.toml" {
		t.Errorf("runtime options extension: found %v, %v, %+v", ok, err, &got)
	}
}

func TestLegacyStartErrors(t *testing.T) {
	t.Chdir(t.TempDir())
	getenv := func(string) string { return "" }
	failing := &fakeShim{err: errors.New("no VM for you")}
	for _, tc := range []struct {
		name  string
		s     *fakeShim
		inv   invocation
		stdin []byte
		want  string
	}{
		{"no namespace", &fakeShim{}, invocation{id: "abc", action: "start"}, nil, "shim namespace cannot be empty"},
		{"no id", &fakeShim{}, invocation{namespace: "default", action: "start"}, nil, "shim id cannot be empty"},
		{"options that are no Any", &fakeShim{}, invocation{id: "abc", namespace: "default", action: "start"}, []byte{0xff}, "runtime options on stdin: "},
		{"start fails", failing, invocation{id: "abc", namespace: "default", action: "start"}, nil, "no VM for you"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := legacyStart(context.Background(), tc.s, tc.inv, tc.stdin, getenv)
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Errorf("legacyStart = %q, %v; want error %q", out, err, tc.want)
			}
		})
	}
}

func TestReplaceStdin(t *testing.T) {
	saved := os.Stdin
	t.Cleanup(func() { os.Stdin = saved })
	big := make([]byte, 1<<20) // more than a pipe holds: the writer must not block the caller
	big[len(big)-1] = 7
	if err := replaceStdin(big); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(os.Stdin)
	if err != nil || len(got) != len(big) || got[len(got)-1] != 7 {
		t.Fatalf("read back %d bytes, %v", len(got), err)
	}
}
