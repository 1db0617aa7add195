// spdy-client: a k8s remotecommand SPDY client built exactly as crictl builds its exec client
// (client-go tools/remotecommand.NewSPDYExecutor, POST), used to record real client frames and to
// check that pycrio's SPDY session talks to the real spdystream (tests/test_spdy.py).
//
//	spdy-client -url http://127.0.0.1:PORT/exec/x [-stdin-bytes N | -stdin] [-tty] [-no-stderr]
//
// Prints "stdout_bytes=N stdout_sha256=HEX stderr=..." on its stdout when done; the remote exit
// code (from the error stream's Status) becomes its exit code.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"net/url"
	"os"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
	exec "k8s.io/client-go/util/exec"
)

// patternReader yields n bytes of a fixed pseudo-random pattern, in odd-sized chunks.
type patternReader struct {
	left  int
	state uint32
}

func (p *patternReader) Read(b []byte) (int, error) {
	if p.left <= 0 {
		return 0, io.EOF
	}
	n := len(b)
	if n > p.left {
		n = p.left
	}
	for i := 0; i < n; i++ {
		p.state = p.state*1103515245 + 12345
		b[i] = byte(p.state >> 16)
	}
	p.left -= n
	return n, nil
}

type countingHash struct {
	n int
	h hash.Hash
}

func (c *countingHash) Write(b []byte) (int, error) {
	c.n += len(b)
	return c.h.Write(b)
}

func main() {
	rawURL := flag.String("url", "", "exec URL")
	stdinBytes := flag.Int("stdin-bytes", -1, "send this many pattern bytes on stdin, then EOF")
	useStdin := flag.Bool("stdin", false, "pass this process's stdin")
	tty := flag.Bool("tty", false, "request a tty")
	noStderr := flag.Bool("no-stderr", false, "do not request stderr")
	timeout := flag.Duration("timeout", 60*time.Second, "overall timeout")
	flag.Parse()

	u, err := url.Parse(*rawURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad url:", err)
		os.Exit(125)
	}
	config := &rest.Config{TLSClientConfig: rest.TLSClientConfig{Insecure: u.Scheme == "https"}}
	executor, err := remotecommand.NewSPDYExecutor(config, "POST", u)
	if err != nil {
		fmt.Fprintln(os.Stderr, "executor:", err)
		os.Exit(125)
	}
	stdout := &countingHash{h: sha256.New()}
	var stderr bytes.Buffer
	opts := remotecommand.StreamOptions{Stdout: stdout, Tty: *tty}
	if !*noStderr {
		opts.Stderr = &stderr
	}
	if *stdinBytes >= 0 {
		opts.Stdin = &patternReader{left: *stdinBytes, state: 1}
	} else if *useStdin {
		opts.Stdin = os.Stdin
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	err = executor.StreamWithContext(ctx, opts)
	fmt.Printf("stdout_bytes=%d stdout_sha256=%x stderr=%q\n", stdout.n, stdout.h.Sum(nil), stderr.String())
	if err != nil {
		var exitErr exec.ExitError
		if errors.As(err, &exitErr) && exitErr.Exited() {
			fmt.Printf("exit=%d\n", exitErr.ExitStatus())
			os.Exit(exitErr.ExitStatus())
		}
		fmt.Printf("error=%q\n", err.Error())
		os.Exit(126)
	}
	fmt.Println("exit=0")
}
