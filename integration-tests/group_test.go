package integration

import (
	"os"
	"path/filepath"
	"testing"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// Containers with the same io.caisson.group annotation share one shim and one VM, whose
// pod is the group's: its state is under the group's name (shim/podid), where the shim's
// cleanup after the shim is killed (`shim delete`, shim/manager's Stop) looks for it.
func TestGroupShimKilled(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	ns, _ := namespaces.Namespace(ctx)
	group := oci.WithAnnotations(map[string]string{"io.caisson.group": "grp"})

	first := newContainer(t, e, image, "first", oci.WithProcessArgs("sleep", "100000"), group)
	var o1 outputs
	task, exit := startTask(t, ctx, first, &o1)
	second := newContainer(t, e, image, "second", oci.WithProcessArgs("sleep", "100000"), group)
	var o2 outputs
	task2, _ := startTask(t, ctx, second, &o2)
	if pids := e.QEMUs(); len(pids) != 1 {
		t.Fatalf("%d QEMU processes for one group, want 1: %v", len(pids), pids)
	}
	if _, err := os.Stat(filepath.Join(e.StateDir, ns+"-grp")); err != nil {
		t.Fatalf("the group's pod state is not under its name: %v", err)
	}
	if _, err := task2.Delete(ctx, containerd.WithProcessKill); err != nil {
		t.Fatal(err)
	}
	killShim(t, ctx, e, first, task, exit)
}
