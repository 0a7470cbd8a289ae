package harness

import (
	"io"
	"log"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Registry is an OCI registry (go-containerregistry's) on 127.0.0.1, which
// containerd reaches over plain HTTP because the host is a loopback address.
type Registry struct {
	// Host is 127.0.0.1:PORT.
	Host string
}

// StartRegistry serves an empty registry until the test ends.
func StartRegistry(t testing.TB) *Registry {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	return &Registry{Host: u.Host}
}

// Push uploads img as repo:tag and returns its reference.
func (r *Registry) Push(t testing.TB, repoTag string, img v1.Image) string {
	t.Helper()
	ref, err := name.ParseReference(r.Host+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref.String()
}

// BusyboxImage is the test busybox image (BusyboxLayers) with cmd as its command.
func BusyboxImage(t testing.TB, cmd ...string) v1.Image {
	t.Helper()
	return Image(t, BusyboxLayers(t), cmd...)
}
