// Package launch starts the shim under every containerd from 1.7 to 2.4.
//
// containerd starts a shim by running its binary with the action "start", and
// the two generations of containerd speak different start protocols:
//
//   - containerd ≥ 2.3 (the bootstrap API): BootstrapParams, a protobuf, on
//     stdin; a BootstrapResult, a protobuf, on stdout.
//   - containerd 1.7–2.2 (the legacy protocol): the containerd addresses in
//     flags and environment, the runtime's options (if any) on stdin; on stdout,
//     the JSON {"version":2,"address":...,"protocol":"ttrpc"}. containerd reads
//     stdout and stderr together (CombinedOutput), so nothing else may be
//     written to either.
//
// containerd's pkg/shim (2.4) serves only the first and fails the second with
// "shim was started through the deprecated API". Run answers a legacy start
// itself, with the same shim.Shim, and hands every other invocation (a
// bootstrap start, delete, -info, -version, the long-running server) to
// pkg/shim.
package launch

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"syscall"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf/proto"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/anypb"
)

// maxInput bounds what a start reads from stdin, as pkg/shim does.
const maxInput = 10 << 20

// LegacyVersion is the shim protocol version a legacy start answers: task API
// v2, which containerd 1.7 requires and 2.0–2.2 accept (shim/taskv2 serves it).
const LegacyVersion = 2

// Run runs the shim binary: it answers a legacy start and otherwise runs
// containerd's shim.RunShim.
func Run(ctx context.Context, s shim.Shim, opts ...shim.BinaryOpts) {
	inv, err := parseArgs(os.Args[1:])
	if err != nil || inv.action != "start" {
		// pkg/shim parses the flags again and reports their errors itself.
		shim.RunShim(ctx, s, opts...)
		return
	}
	input, err := io.ReadAll(io.LimitReader(os.Stdin, maxInput))
	if err != nil {
		fail(s, fmt.Errorf("read stdin: %w", err))
	}
	if IsBootstrap(input, inv.id, inv.namespace) {
		if err := replaceStdin(input); err != nil {
			fail(s, err)
		}
		shim.RunShim(ctx, s, opts...)
		return
	}
	out, err := legacyStart(ctx, s, inv, input, os.Getenv)
	if err != nil {
		fail(s, err)
	}
	os.Stdout.Write(out)
}

// fail reports err as pkg/shim does: on stderr, with exit status 1.
func fail(s shim.Shim, err error) {
	fmt.Fprintf(os.Stderr, "%s: %s", s.Name(), err)
	os.Exit(1)
}

// invocation is what a start's command line says (pkg/shim's flags).
type invocation struct {
	id, namespace, address string
	debug                  bool
	action                 string
}

// parseArgs parses the flags containerd passes to a shim, with pkg/shim's
// names, without touching the global flag set that pkg/shim will parse.
func parseArgs(args []string) (invocation, error) {
	var inv invocation
	fs := flag.NewFlagSet("shim", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.BoolVar(&inv.debug, "debug", false, "")
	fs.StringVar(&inv.namespace, "namespace", "", "")
	fs.StringVar(&inv.id, "id", "", "")
	fs.StringVar(&inv.address, "address", "", "")
	var ignored string
	var ignoredBool bool
	for _, name := range []string{"socket", "debug-socket", "bundle", "publish-binary"} {
		fs.StringVar(&ignored, name, "", "")
	}
	for _, name := range []string{"v", "version", "info"} {
		fs.BoolVar(&ignoredBool, name, false, "")
	}
	if err := fs.Parse(args); err != nil {
		return inv, err
	}
	inv.action = fs.Arg(0)
	return inv, nil
}

// IsBootstrap reports whether a start's stdin holds bootstrap parameters, with
// pkg/shim's test: legacy runtime options may decode as BootstrapParams too, so
// the instance and namespace must match the command line's.
func IsBootstrap(input []byte, id, namespace string) bool {
	if len(input) == 0 {
		return false
	}
	var p bootapi.BootstrapParams
	if err := proto.Unmarshal(input, &p); err != nil {
		return false
	}
	return p.InstanceID == id && p.Namespace == namespace
}

// replaceStdin gives pkg/shim the bytes already read from stdin.
func replaceStdin(input []byte) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("stdin pipe: %w", err)
	}
	go func() {
		w.Write(input)
		w.Close()
	}()
	os.Stdin = r
	return nil
}

// legacyResult is the JSON a legacy start prints (containerd 1.7–2.2's
// client.BootstrapParams).
type legacyResult struct {
	Version  int    `json:"version"`
	Address  string `json:"address"`
	Protocol string `json:"protocol"`
}

// legacyStart starts the shim for containerd 1.7–2.2 and returns what to print.
// options is the start's stdin: the runtime options (a protobuf Any), or
// nothing; they reach s as containerd ≥ 2.3 sends them, as an extension of the
// bootstrap parameters. The legacy protocol has no socket directory, so the
// socket goes where containerd's own shims of those versions put theirs
// (pkg/shim's default, /run/containerd/s), named after containerd's address,
// namespace and the pod.
func legacyStart(ctx context.Context, s shim.Shim, inv invocation, options []byte, getenv func(string) string) ([]byte, error) {
	if inv.namespace == "" {
		return nil, fmt.Errorf("shim namespace cannot be empty")
	}
	if inv.id == "" {
		return nil, fmt.Errorf("shim id cannot be empty")
	}
	address := inv.address
	if address == "" {
		address = getenv("GRPC_ADDRESS")
	}
	params := &bootapi.BootstrapParams{
		InstanceID:             inv.id,
		Namespace:              inv.namespace,
		ContainerdGrpcAddress:  address,
		ContainerdTtrpcAddress: getenv("TTRPC_ADDRESS"),
		LogLevel:               bootapi.LogLevel_LOG_LEVEL_INFO,
	}
	if inv.debug {
		params.LogLevel = bootapi.LogLevel_LOG_LEVEL_DEBUG
	}
	if len(options) > 0 {
		var opts anypb.Any
		if err := proto.Unmarshal(options, &opts); err != nil {
			return nil, fmt.Errorf("runtime options on stdin: %w", err)
		}
		if err := params.AddExtension(&opts); err != nil {
			return nil, err
		}
	}
	// Anything logged now would corrupt the answer (see the package comment):
	// send it to the shim log containerd reads, when there is one.
	ctx = namespaces.WithNamespace(ctx, inv.namespace)
	logger := log.G(ctx)
	restore := logger.Logger.Out
	w := startLog()
	logger.Logger.SetOutput(w)
	defer func() {
		logger.Logger.SetOutput(restore)
		w.Close()
	}()

	result, err := s.Start(ctx, params)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := json.NewEncoder(&out).Encode(legacyResult{Version: LegacyVersion, Address: result.Address, Protocol: "ttrpc"}); err != nil {
		return nil, err
	}
	return bytes.TrimSpace(out.Bytes()), nil
}

// startLog is the bundle's "log" FIFO, which containerd reads while the shim
// starts, opened without blocking (it fails if no reader is there); else nothing.
func startLog() io.WriteCloser {
	f, err := os.OpenFile("log", os.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nopCloser{io.Discard}
	}
	return f
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }
