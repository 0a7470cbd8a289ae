package taskv2

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	taskv2 "github.com/containerd/containerd/api/runtime/task/v2"
	taskv3 "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

// fakeTask answers State and Create from its fields and fails every other call.
type fakeTask struct {
	taskv3.TTRPCTaskService // nil: an unexpected call panics, which ttrpc reports
	created                 *taskv3.CreateTaskRequest
}

func (f *fakeTask) State(_ context.Context, r *taskv3.StateRequest) (*taskv3.StateResponse, error) {
	if r.ID == "missing" {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound)
	}
	return &taskv3.StateResponse{ID: r.ID, ExecID: r.ExecID, Pid: 42, Bundle: "/b", Terminal: true}, nil
}

func (f *fakeTask) Create(_ context.Context, r *taskv3.CreateTaskRequest) (*taskv3.CreateTaskResponse, error) {
	f.created = r
	return &taskv3.CreateTaskResponse{Pid: 7}, nil
}

func (f *fakeTask) Shutdown(context.Context, *taskv3.ShutdownRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

func serve(t *testing.T, svc taskv3.TTRPCTaskService) taskv2.TTRPCTaskService {
	t.Helper()
	server, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	if err := Register(server, svc); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	go server.Serve(context.Background(), l)
	t.Cleanup(func() { server.Close() })
	conn, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(conn)
	t.Cleanup(func() { client.Close() })
	return taskv2.NewTTRPCTaskClient(client)
}

func TestV2CallsReachV3Service(t *testing.T) {
	fake := &fakeTask{}
	c := serve(t, fake)
	ctx := context.Background()

	st, err := c.State(ctx, &taskv2.StateRequest{ID: "c1", ExecID: "e1"})
	if err != nil {
		t.Fatal(err)
	}
	if st.ID != "c1" || st.ExecID != "e1" || st.Pid != 42 || st.Bundle != "/b" || !st.Terminal {
		t.Errorf("State over v2 = %+v", st)
	}

	mounts := []*types.Mount{{Type: "erofs", Source: "/l.erofs", Options: []string{"ro"}}}
	cr, err := c.Create(ctx, &taskv2.CreateTaskRequest{ID: "c1", Bundle: "/b", Rootfs: mounts, Stdout: "/o"})
	if err != nil {
		t.Fatal(err)
	}
	if cr.Pid != 7 {
		t.Errorf("Create pid = %d, want 7", cr.Pid)
	}
	if fake.created == nil || fake.created.Stdout != "/o" || len(fake.created.Rootfs) != 1 || fake.created.Rootfs[0].Source != "/l.erofs" {
		t.Errorf("v3 service got %+v", fake.created)
	}

	if _, err := c.Shutdown(ctx, &taskv2.ShutdownRequest{ID: "c1"}); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

func TestV2ErrorsKeepTheirKind(t *testing.T) {
	c := serve(t, &fakeTask{})
	_, err := c.State(context.Background(), &taskv2.StateRequest{ID: "missing"})
	if !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		t.Errorf("State(missing) over v2 = %v, want NotFound", err)
	}
}

// TestEveryV2MethodIsServed: containerd's v2 client may call any method of the v2
// service; each must exist in the description (a v3 method renamed or dropped
// would otherwise surface as "method not found" in production only).
func TestEveryV2MethodIsServed(t *testing.T) {
	desc, err := Desc(&fakeTask{})
	if err != nil {
		t.Fatal(err)
	}
	v2 := taskv2.File_runtime_task_v2_shim_proto.Services().ByName("Task")
	for i := 0; i < v2.Methods().Len(); i++ {
		name := string(v2.Methods().Get(i).Name())
		if _, ok := desc.Methods[name]; !ok {
			t.Errorf("v2 method %s is not served", name)
		}
	}
	if len(desc.Methods) != v2.Methods().Len() {
		t.Errorf("served %d methods, v2 has %d", len(desc.Methods), v2.Methods().Len())
	}
}
