// Command pause is the stand-in for registry.k8s.io/pause: a pod's placeholder process.
// It blocks until SIGINT or SIGTERM (then exits 0, as pause.c does) and reaps the zombies
// reparented to it meanwhile, which a PID-namespace init must do.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

const version = "3.9 (pycrio stand-in)"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause.go version", version)
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "Warning: pause should be the first process")
	}
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		fmt.Fprintf(os.Stderr, "Shutting down, got signal: %s\n", describe(sig))
		os.Exit(0)
	}
}

// reap collects every exited child; one SIGCHLD may stand for several.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

// describe names a signal as strsignal(3) does ("Terminated", "Interrupt").
func describe(sig os.Signal) string {
	switch sig {
	case syscall.SIGTERM:
		return "Terminated"
	case syscall.SIGINT:
		return "Interrupt"
	}
	return sig.String()
}
