// spdy-client: a k8s remotecommand SPDY client built exactly as crictl builds its exec client
// (client-go tools/remotecommand.NewSPDYExecutor, POST), used to record real client frames and to
// check that pycrio's SPDY session talks to the real spdystream (tests/test_spdy.py).
//
//	spdy-client -url http://127.0.0.1:PORT/exec/x [-stdin-bytes N | -stdin] [-tty] [-no-stderr]
//	spdy-client -url http://127.0.0.1:PORT/portforward/x -portforward REMOTE [-send N] [-conns K]
//
// exec: prints "stdout_bytes=N stdout_sha256=HEX stderr=..." when done; the remote exit code
// (from the error stream's Status) becomes its exit code.
// port-forward (as crictl port-forward: spdy.NewDialerForStreaming, portforward.NewForStreaming):
// forwards a free local port to REMOTE, opens K connections to it at once, each sends N pattern
// bytes, half-closes and reads until EOF; prints "conn=I bytes=N sha256=HEX" per connection.
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
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
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
	pfPort := flag.Int("portforward", 0, "port-forward to this remote port instead of exec")
	send := flag.Int("send", 0, "port-forward: bytes each connection sends")
	conns := flag.Int("conns", 1, "port-forward: parallel connections")
	flag.Parse()

	u, err := url.Parse(*rawURL)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad url:", err)
		os.Exit(125)
	}
	config := &rest.Config{TLSClientConfig: rest.TLSClientConfig{Insecure: u.Scheme == "https"}}
	if *pfPort > 0 {
		os.Exit(forward(config, u, *pfPort, *send, *conns, *timeout))
	}
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

func forward(config *rest.Config, u *url.URL, remote, send, conns int, timeout time.Duration) int {
	tr, upgrader, err := spdy.RoundTripperFor(config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "round tripper:", err)
		return 125
	}
	dialer := spdy.NewDialerForStreaming(upgrader, &http.Client{Transport: tr}, "POST", u)
	stop, ready := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddressesForStreaming(dialer, []string{"127.0.0.1"},
		[]string{fmt.Sprintf("0:%d", remote)}, stop, ready, io.Discard, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "port forwarder:", err)
		return 125
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-done:
		fmt.Printf("error=%q\n", fmt.Sprint(err))
		return 126
	case <-time.After(timeout):
		fmt.Println("error=\"timeout waiting for the forwarder\"")
		return 126
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) != 1 {
		fmt.Printf("error=%q\n", fmt.Sprint("ports: ", err))
		return 126
	}
	addr := fmt.Sprintf("127.0.0.1:%d", ports[0].Local)
	results := make([]string, conns)
	var wg sync.WaitGroup
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i] = oneConnection(addr, send, timeout)
		}(i)
	}
	wg.Wait()
	close(stop)
	<-done
	failed := 0
	for i, r := range results {
		fmt.Printf("conn=%d %s\n", i, r)
		if len(r) >= 6 && r[:6] == "error=" {
			failed++
		}
	}
	if failed > 0 {
		return 1
	}
	return 0
}

func oneConnection(addr string, send int, timeout time.Duration) string {
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return fmt.Sprintf("error=%q", err.Error())
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	go func() {
		_, _ = io.Copy(conn, &patternReader{left: send, state: 1})
		_ = conn.(*net.TCPConn).CloseWrite()
	}()
	got := &countingHash{h: sha256.New()}
	if _, err := io.Copy(got, conn); err != nil {
		return fmt.Sprintf("error=%q", err.Error())
	}
	return fmt.Sprintf("bytes=%d sha256=%x", got.n, got.h.Sum(nil))
}
