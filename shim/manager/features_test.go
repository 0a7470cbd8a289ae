package manager

import (
	"slices"
	"testing"

	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runtime-spec/specs-go/features"

	_ "github.com/containerd/containerd/v2/core/runtime" // the Features type URL, as containerd has it
)

// TestRuntimeFeatures: containerd's CRI allows recursive read-only mounts only for a
// handler whose features list "rro", and CRI user namespaces only with "user" and
// idmapped mounts; the features reach it as the Any it decodes.
func TestRuntimeFeatures(t *testing.T) {
	a, err := marshalFeatures()
	if err != nil {
		t.Fatal(err)
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		t.Fatal(err)
	}
	f, ok := v.(*features.Features)
	if !ok {
		t.Fatalf("features decode as %T", v)
	}
	if !slices.Contains(f.MountOptions, "rro") {
		t.Errorf("mount options %v lack rro", f.MountOptions)
	}
	if f.Linux == nil || slices.Contains(f.Linux.Namespaces, "user") || !slices.Contains(f.Linux.Namespaces, "pid") {
		t.Errorf("namespaces %+v: want pid, not user", f.Linux)
	}
	if f.Linux.MountExtensions != nil {
		t.Errorf("idmapped mounts offered: %+v", f.Linux.MountExtensions)
	}
}
