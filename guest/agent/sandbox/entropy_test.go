package sandbox

import (
	"crypto/rand"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// TestAddEntropy mixes random bytes into the running kernel's pool and reseeds it (as
// root: the ioctls need CAP_SYS_ADMIN); nothing is an error.
func TestAddEntropy(t *testing.T) {
	if err := AddEntropy(nil); err != nil {
		t.Fatalf("no bytes: %v", err)
	}
	testutil.RequireRoot(t)
	b := make([]byte, 64)
	rand.Read(b)
	if err := AddEntropy(b); err != nil {
		t.Fatal(err)
	}
}
