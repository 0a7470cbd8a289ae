// Command nonewprivs is the look-alike of registry.k8s.io/e2e-test-images/nonewprivs
// that critest's NoNewPrivs tests run: installed set-user-ID root, it prints the
// effective uid it runs with, which is 0 unless no_new_privs kept the kernel from
// honouring the set-user-ID bit.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
}
