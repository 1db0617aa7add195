// Command nginx is the stand-in for e2e-test-images/nginx (and cri-tools' hostnet-nginx): a
// process named nginx that serves /usr/share/nginx/html over HTTP on the port of the first
// `listen N;` in /etc/nginx/conf.d/default.conf (80 without one), writes its pid to
// /var/run/nginx.pid and exits on SIGTERM, SIGINT or SIGQUIT.
//
// Like nginx's master it shows "nginx: master process <command line>" as its command line
// (/proc/PID/cmdline): it re-executes itself once with that argv[0], which keeps its pid and,
// the executable being /usr/sbin/nginx, its name (comm) "nginx".
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	confPath = "/etc/nginx/conf.d/default.conf"
	pidPath  = "/var/run/nginx.pid"
	htmlRoot = "/usr/share/nginx/html"
	title    = "nginx: master process "
	version  = "nginx/1.14.2 (pycrio stand-in)"
)

var listenRe = regexp.MustCompile(`(?m)^\s*listen\s+([^\s;]+)`)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-v" || os.Args[1] == "-V") {
		fmt.Fprintln(os.Stderr, "nginx version:", version)
		return
	}
	if !strings.HasPrefix(os.Args[0], title) {
		retitle()
	}
	port, err := listenPort(confPath)
	if err != nil {
		fatal("%v", err)
	}
	listener, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		fatal("bind() to 0.0.0.0:%d failed (%v)", port, err)
	}
	if err := os.WriteFile(pidPath, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		fatal("open() %q failed (%v)", pidPath, err)
	}
	server := &http.Server{Handler: accessLog(http.FileServer(http.Dir(htmlRoot))), ReadHeaderTimeout: 30 * time.Second}
	go func() {
		if err := server.Serve(listener); err != nil && err != http.ErrServerClosed {
			fatal("serve: %v", err)
		}
	}()
	logf("[notice] %d#0: start worker processes (listening on port %d)", os.Getpid(), port)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT)
	sig := <-signals
	logf("[notice] %d#0: signal %d (%s) received, exiting", os.Getpid(), sig.(syscall.Signal), sig)
	_ = os.Remove(pidPath)
	os.Exit(0)
}

// retitle re-executes this binary with nginx's master-process title as its only argument.
// On failure it goes on with the original command line: serving matters more than the title.
func retitle() {
	exe, err := os.Executable()
	if err != nil {
		logf("[warn] cannot find own executable: %v", err)
		return
	}
	argv := []string{title + strings.Join(os.Args, " ")}
	err = syscall.Exec(exe, argv, os.Environ())
	logf("[warn] re-exec as %q failed: %v", argv[0], err)
}

// listenPort reads the port of the first listen directive ("listen 80;", "listen [::]:80;").
func listenPort(path string) (int, error) {
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return 80, nil
	}
	if err != nil {
		return 0, err
	}
	match := listenRe.FindSubmatch(data)
	if match == nil {
		return 80, nil
	}
	value := string(match[1])
	if i := strings.LastIndex(value, ":"); i >= 0 {
		value = value[i+1:]
	}
	port, err := strconv.Atoi(value)
	if err != nil || port <= 0 || port > 65535 {
		return 0, fmt.Errorf("invalid port in \"listen %s\" of %s", match[1], path)
	}
	return port, nil
}

// accessLog writes one line per request to stdout, as the official image's access.log does.
func accessLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Server", version)
		recorder := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(recorder, r)
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Printf("%s - - [%s] \"%s %s %s\" %d %d \"-\" %q\n", host, time.Now().Format("02/Jan/2006:15:04:05 -0700"),
			r.Method, r.URL.RequestURI(), r.Proto, recorder.status, recorder.bytes, r.UserAgent())
	})
}

type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(data []byte) (int, error) {
	n, err := s.ResponseWriter.Write(data)
	s.bytes += n
	return n, err
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, time.Now().Format("2006/01/02 15:04:05 ")+format+"\n", args...)
}

func fatal(format string, args ...any) {
	logf("[emerg] "+format, args...)
	os.Exit(1)
}
