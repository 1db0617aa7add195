// Command nnp is the stand-in for e2e-test-images/nonewprivs: installed setuid root (4755),
// it prints the effective uid it got. Run as a non-root user, "Effective uid: 0" means execve
// honoured the setuid bit; with no_new_privs set the kernel ignores it and the caller's uid shows.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
}
