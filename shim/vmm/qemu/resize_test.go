package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

// resizeQEMU is a fake QEMU for Resize: it answers query-memory-devices and
// query-hotpluggable-cpus from its state and applies object-add, device_add and object-del
// as QEMU would (a pc-dimm takes its size from its backend; a DIMM placed where QEMU
// would not put one, off the memory-block-aligned end, is refused), recording each
// command.
type resizeQEMU struct {
	mu       sync.Mutex
	maxCPUs  int
	cpus     int
	objects  map[string]int64 // backend id -> size
	mem      []map[string]any // query-memory-devices entries
	commands []string
	// failDevice makes device_add of this driver fail.
	failDevice string
}

func (f *resizeQEMU) handle(cmd string, args map[string]any) (any, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.commands = append(f.commands, cmd)
	switch cmd {
	case "query-memory-devices":
		return f.mem, nil
	case "query-hotpluggable-cpus":
		var l []map[string]any
		for i := f.maxCPUs - 1; i >= 0; i-- { // QEMU lists the last first
			c := map[string]any{"type": "max-x86_64-cpu", "vcpus-count": 1,
				"props": map[string]int{"socket-id": 0, "core-id": i, "thread-id": 0}}
			if i < f.cpus {
				c["qom-path"] = fmt.Sprintf("/machine/unattached/device[%d]", i)
			}
			l = append(l, c)
		}
		return l, nil
	case "object-add":
		f.objects[args["id"].(string)] = int64(args["size"].(float64))
		return map[string]any{}, nil
	case "object-del":
		delete(f.objects, args["id"].(string))
		return map[string]any{}, nil
	case "device_add":
		if args["driver"] == f.failDevice {
			return nil, errors.New("device_add refused by the test")
		}
		switch args["driver"] {
		case "pc-dimm":
			size := f.objects[args["memdev"].(string)]
			addr := uint64(0x140000000)
			if a, ok := args["addr"].(float64); ok {
				addr = uint64(a)
			}
			if addr%(memoryBlockMiB<<20) != 0 {
				return nil, fmt.Errorf("dimm at %#x, off a memory block", addr)
			}
			f.mem = append(f.mem, map[string]any{"type": "dimm", "data": map[string]any{"id": args["id"], "addr": addr, "size": size}})
		case "max-x86_64-cpu":
			if int(args["core-id"].(float64)) != f.cpus {
				return nil, fmt.Errorf("cpu at core %v, want the next free one, %d", args["core-id"], f.cpus)
			}
			f.cpus++
		}
		return map[string]any{}, nil
	}
	return nil, fmt.Errorf("unexpected command %s", cmd)
}

// serve answers QMP on conn until it closes.
func (f *resizeQEMU) serve(conn net.Conn) {
	fmt.Fprint(conn, `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}`+"\r\n")
	sc := bufio.NewScanner(conn)
	for sc.Scan() {
		var req struct {
			Execute   string         `json:"execute"`
			Arguments map[string]any `json:"arguments"`
			ID        any            `json:"id"`
		}
		if json.Unmarshal(sc.Bytes(), &req) != nil {
			return
		}
		id, _ := json.Marshal(req.ID)
		var resp []byte
		if req.Execute == "qmp_capabilities" {
			resp = []byte(fmt.Sprintf(`{"return": {}, "id": %s}`, id))
		} else if ret, err := f.handle(req.Execute, req.Arguments); err != nil {
			resp = []byte(fmt.Sprintf(`{"error": {"class": "GenericError", "desc": %q}, "id": %s}`, err.Error(), id))
		} else {
			b, _ := json.Marshal(ret)
			resp = []byte(fmt.Sprintf(`{"return": %s, "id": %s}`, b, id))
		}
		conn.Write(append(resp, '\r', '\n'))
	}
}

// resizeVM is a VM of cfg whose QMP is f, as if started.
func resizeVM(t *testing.T, cfg vmm.Config, f *resizeQEMU) *VM {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		file := os.NewFile(uintptr(fd), "qmp")
		c, err := net.FileConn(file)
		file.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns[i] = c
	}
	go f.serve(conns[1])
	c, err := qmp.New(context.Background(), conns[0])
	if err != nil {
		t.Fatal(err)
	}
	cfg.StateDir, cfg.Kernel = t.TempDir(), "/k"
	v, err := New(cfg, Config{})
	if err != nil {
		t.Fatal(err)
	}
	v.qmp = c
	return v
}

func TestResize(t *testing.T) {
	base := vmm.Config{VCPUs: 1, MaxVCPUs: 4, MemoryMiB: 256, MaxMemoryMiB: 4096}
	for _, tc := range []struct {
		name    string
		pmem    bool // a PMEM disk of 34 MiB sits where the first DIMM would go
		steps   []vmm.Size
		want    []vmm.Size // after each step
		objects map[string]int64
		cpus    int
		err     string // of the last step
		errKind error
	}{
		{
			name:    "memory rounded up to a block and CPUs, twice",
			steps:   []vmm.Size{{MemoryMiB: 300, VCPUs: 2}, {MemoryMiB: 800, VCPUs: 4}},
			want:    []vmm.Size{{MemoryMiB: 384, VCPUs: 2}, {MemoryMiB: 896, VCPUs: 4}},
			objects: map[string]int64{"dimm0-mem": 128 << 20, "dimm1-mem": 512 << 20},
			cpus:    4,
		},
		{
			name:    "the same size again changes nothing",
			steps:   []vmm.Size{{MemoryMiB: 256, VCPUs: 1}},
			want:    []vmm.Size{{MemoryMiB: 256, VCPUs: 1}},
			objects: map[string]int64{},
			cpus:    1,
		},
		{
			name:    "after a PMEM disk, on the next block",
			pmem:    true,
			steps:   []vmm.Size{{MemoryMiB: 512, VCPUs: 1}},
			want:    []vmm.Size{{MemoryMiB: 512, VCPUs: 1}},
			objects: map[string]int64{"dimm0-mem": 256 << 20},
			cpus:    1,
		},
		{
			name:    "shrinking memory is refused",
			steps:   []vmm.Size{{MemoryMiB: 512, VCPUs: 2}, {MemoryMiB: 384, VCPUs: 2}},
			want:    []vmm.Size{{MemoryMiB: 512, VCPUs: 2}, {MemoryMiB: 512, VCPUs: 2}},
			objects: map[string]int64{"dimm0-mem": 256 << 20},
			cpus:    2,
			err:     "from 512 MiB and 2 vCPUs to 384 MiB and 2 vCPUs: a VM only grows",
			errKind: errdefs.ErrInvalidArgument,
		},
		{
			name:    "shrinking vCPUs is refused",
			steps:   []vmm.Size{{MemoryMiB: 256, VCPUs: 3}, {MemoryMiB: 1024, VCPUs: 2}},
			want:    []vmm.Size{{MemoryMiB: 256, VCPUs: 3}, {MemoryMiB: 256, VCPUs: 3}},
			objects: map[string]int64{},
			cpus:    3,
			err:     "a VM only grows",
			errKind: errdefs.ErrInvalidArgument,
		},
		{
			name:    "above max vCPUs",
			steps:   []vmm.Size{{MemoryMiB: 512, VCPUs: 5}},
			want:    []vmm.Size{{MemoryMiB: 256, VCPUs: 1}},
			objects: map[string]int64{},
			cpus:    1,
			err:     "to 5 vCPUs: at most 4",
			errKind: errdefs.ErrInvalidArgument,
		},
		{
			name:    "above max memory",
			steps:   []vmm.Size{{MemoryMiB: 4100, VCPUs: 1}},
			want:    []vmm.Size{{MemoryMiB: 256, VCPUs: 1}},
			objects: map[string]int64{},
			cpus:    1,
			err:     "to 4100 MiB of memory: at most 4096 MiB",
			errKind: errdefs.ErrInvalidArgument,
		},
		{
			name: "memory slots used up",
			steps: []vmm.Size{{MemoryMiB: 384, VCPUs: 1}, {MemoryMiB: 512, VCPUs: 1}, {MemoryMiB: 640, VCPUs: 1},
				{MemoryMiB: 768, VCPUs: 1}, {MemoryMiB: 896, VCPUs: 1}},
			want: []vmm.Size{{MemoryMiB: 384, VCPUs: 1}, {MemoryMiB: 512, VCPUs: 1}, {MemoryMiB: 640, VCPUs: 1},
				{MemoryMiB: 768, VCPUs: 1}, {MemoryMiB: 768, VCPUs: 1}},
			objects: map[string]int64{"dimm0-mem": 128 << 20, "dimm1-mem": 128 << 20, "dimm2-mem": 128 << 20, "dimm3-mem": 128 << 20},
			cpus:    1,
			err:     "memory slots are used",
			errKind: errdefs.ErrResourceExhausted,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := base
			f := &resizeQEMU{maxCPUs: cfg.MaxVCPUs, cpus: cfg.VCPUs, objects: map[string]int64{}}
			if tc.pmem {
				f.mem = append(f.mem, map[string]any{"type": "virtio-pmem", "data": map[string]any{"id": "pmem0", "memaddr": 0x140000000, "size": 34 << 20}})
			}
			v := resizeVM(t, cfg, f)
			var err error
			for i, s := range tc.steps {
				var got vmm.Size
				got, err = v.Resize(context.Background(), s)
				if i < len(tc.steps)-1 && err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if got != tc.want[i] {
					t.Errorf("step %d: size %+v, want %+v", i, got, tc.want[i])
				}
			}
			switch {
			case tc.err == "" && err != nil:
				t.Fatal(err)
			case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, tc.errKind)):
				t.Fatalf("error %v, want %q (%v)", err, tc.err, tc.errKind)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if fmt.Sprint(f.objects) != fmt.Sprint(tc.objects) {
				t.Errorf("backends %v, want %v", f.objects, tc.objects)
			}
			if f.cpus != tc.cpus {
				t.Errorf("%d vCPUs plugged, want %d", f.cpus, tc.cpus)
			}
		})
	}
}

// TestResizeFailedDIMMLeavesNoBackend: a DIMM QEMU refuses takes its backend away with it.
func TestResizeFailedDIMMLeavesNoBackend(t *testing.T) {
	f := &resizeQEMU{maxCPUs: 2, cpus: 1, objects: map[string]int64{}, failDevice: "pc-dimm"}
	v := resizeVM(t, vmm.Config{VCPUs: 1, MaxVCPUs: 2, MemoryMiB: 256, MaxMemoryMiB: 4096}, f)
	got, err := v.Resize(context.Background(), vmm.Size{MemoryMiB: 512, VCPUs: 2})
	if err == nil || !strings.Contains(err.Error(), "hot-plug 256 MiB of memory") {
		t.Fatalf("error %v, want the refused DIMM", err)
	}
	if want := (vmm.Size{MemoryMiB: 256, VCPUs: 1}); got != want {
		t.Errorf("size %+v, want %+v", got, want)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.objects) != 0 || f.cpus != 1 {
		t.Errorf("left backends %v and %d vCPUs, want none and 1", f.objects, f.cpus)
	}
}

// A vCPU hot-plug makes VCPUTime find the vCPU threads again; a resize of memory alone
// keeps the threads it found.
func TestResizeForgetsTheVCPUThreads(t *testing.T) {
	f := &resizeQEMU{maxCPUs: 2, cpus: 1, objects: map[string]int64{}}
	v := resizeVM(t, vmm.Config{VCPUs: 1, MaxVCPUs: 2, MemoryMiB: 256, MaxMemoryMiB: 4096}, f)
	keep := func() {
		t.Helper()
		file, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		v.vcpus.files = []*os.File{file}
	}
	keep()
	if _, err := v.Resize(context.Background(), vmm.Size{MemoryMiB: 512, VCPUs: 1}); err != nil {
		t.Fatal(err)
	}
	if v.vcpus.files == nil {
		t.Error("a memory resize forgot the vCPU threads")
	}
	if _, err := v.Resize(context.Background(), vmm.Size{MemoryMiB: 512, VCPUs: 2}); err != nil {
		t.Fatal(err)
	}
	if v.vcpus.files != nil {
		t.Error("the vCPU threads are kept after a vCPU hot-plug")
	}
}
