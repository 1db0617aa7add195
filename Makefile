# pycrio build, install, test and demo.
# `make install` is idempotent: each step leaves a stamp and is skipped when done.
SHELL := /bin/bash
.DEFAULT_GOAL := install

VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := $(abspath $(VENV)/bin)
export PATH := $(BIN):$(PATH)

# Pinned versions of everything fetched at build time.
CRI_API_VERSION   := v0.37.2
CRI_TOOLS_VERSION := v1.37.0
JAEGER_VERSION    := v1.76.0

# Debian packages the daemon and tests need (later issues add runc, conmon, skopeo...).
APT_PACKAGES := ca-certificates procps docker-registry umoci skopeo busybox-static apache2-utils \
  runc crun conmon catatonit containernetworking-plugins iproute2 iptables

CRI_OUT   := src/pycrio/cri
CRI_STUBS := $(CRI_OUT)/api_pb2.py $(CRI_OUT)/api_pb2_grpc.py
MONITOR_STUBS := src/pycrio/monitor/monitor_pb2.py

.PHONY: install apt cni-config stubs test demo bench jaeger jaeger-ui browser critest conformance clean-test-state clean

install: apt cni-config $(VENV)/.installed stubs $(VENV)/.crictl-$(CRI_TOOLS_VERSION)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# A default pod network (bridge pycrio0, 10.85.0.0/16) only where the node has none yet.
CNI_CONF_DIR := /etc/cni/net.d
cni-config:
	@if [ -z "$$(find $(CNI_CONF_DIR) -maxdepth 1 \( -name '*.conf' -o -name '*.conflist' -o -name '*.json' \) 2>/dev/null)" ]; then \
	  install -D -m 0644 contrib/cni/10-pycrio-bridge.conflist $(CNI_CONF_DIR)/10-pycrio-bridge.conflist; \
	  echo "cni: installed the default pycrio network in $(CNI_CONF_DIR)"; fi

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The CRI api.proto comes from the pinned Go module and is compiled into the package;
# it is staged under build/ as pycrio/cri/api.proto so the generated imports are package-relative.
stubs: $(CRI_STUBS) $(MONITOR_STUBS)
# pycrio-monitor's own API (plain protobuf over its unix socket: no gRPC stubs)
$(MONITOR_STUBS): proto/monitor.proto | $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src/pycrio/monitor --pyi_out=src/pycrio/monitor proto/monitor.proto
$(CRI_STUBS) &: Makefile | $(VENV)/.installed
	@dir=$$(go mod download -json k8s.io/cri-api@$(CRI_API_VERSION) | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') && \
	rm -rf build/proto && mkdir -p build/proto/pycrio/cri && \
	cp "$$dir/pkg/apis/runtime/v1/api.proto" build/proto/pycrio/cri/api.proto && \
	chmod u+w build/proto/pycrio/cri/api.proto && \
	$(PY) -m grpc_tools.protoc -Ibuild/proto --python_out=src --pyi_out=src --grpc_python_out=src \
	  build/proto/pycrio/cri/api.proto && \
	echo "stubs: generated from k8s.io/cri-api@$(CRI_API_VERSION)"

$(VENV)/.crictl-$(CRI_TOOLS_VERSION): | $(PY)
	GOBIN=$(BIN) go install sigs.k8s.io/cri-tools/cmd/crictl@$(CRI_TOOLS_VERSION)
	touch $@

# Jaeger serves the demo and the trace tests; `go install` refuses its module (replace
# directives), so it is a tool of the small module in contrib/tools/jaeger. A Go-built Jaeger has
# no web UI of its own: `jaeger-ui` brings the production build of jaeger-ui (pinned, checksummed
# by contrib/tools/jaeger-ui/Cargo.lock, fetched by cargo from crates.io, nothing compiled) to
# build/jaeger-ui, which contrib/jaeger.yaml serves.
jaeger: $(VENV)/.jaeger-$(JAEGER_VERSION) jaeger-ui
$(VENV)/.jaeger-$(JAEGER_VERSION): contrib/tools/jaeger/go.mod | $(PY)
	cd contrib/tools/jaeger && GOBIN=$(BIN) go install tool
	touch $@

CARGO         ?= $(shell command -v cargo || echo $(HOME)/.cargo/bin/cargo)
JAEGER_UI_DIR := build/jaeger-ui
JAEGER_UI_PIN := otlp-embedded-0.0.2
jaeger-ui: $(JAEGER_UI_DIR)/.$(JAEGER_UI_PIN)
$(JAEGER_UI_DIR)/.$(JAEGER_UI_PIN): contrib/tools/jaeger-ui/Cargo.lock contrib/tools/jaeger-ui/Cargo.toml | $(PY)
	@manifest=$$(cd contrib/tools/jaeger-ui && $(CARGO) metadata --locked --format-version 1 | \
	  $(abspath $(PY)) -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "otlp-embedded"))') && \
	ui=$$(dirname "$$manifest")/jaeger-ui/build && test -f "$$ui/index.html" && \
	rm -rf $(JAEGER_UI_DIR) $(JAEGER_UI_DIR).tmp && mkdir -p build && cp -r "$$ui" $(JAEGER_UI_DIR).tmp && \
	mv $(JAEGER_UI_DIR).tmp $(JAEGER_UI_DIR) && touch $@ && \
	echo "jaeger-ui: $$(du -sh $(JAEGER_UI_DIR) | cut -f1) from crates.io $(JAEGER_UI_PIN) in $(JAEGER_UI_DIR)"

# A real kubelet (standalone: static pods, no API server) for `make kubelet-e2e` and
# contrib/kubelet/. k8s.io/kubernetes replaces its staging modules with local paths, so `go install`
# refuses it: a tool of the small module in contrib/tools/kubelet (each staging module pinned to
# its published v0.37.x), built static.
KUBELET_VERSION := v1.37.2
KUBELET_LDFLAGS := -s -w -X k8s.io/component-base/version.gitVersion=$(KUBELET_VERSION) \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37
.PHONY: kubelet kubelet-e2e
kubelet: $(VENV)/.kubelet-$(KUBELET_VERSION)
$(VENV)/.kubelet-$(KUBELET_VERSION): contrib/tools/kubelet/go.mod contrib/tools/kubelet/go.sum | $(PY)
	@echo "kubelet: compiling k8s.io/kubernetes/cmd/kubelet@$(KUBELET_VERSION) (about 20 minutes on 2 cores)"
	cd contrib/tools/kubelet && CGO_ENABLED=0 GOBIN=$(BIN) go install -trimpath -ldflags '$(KUBELET_LDFLAGS)' tool
	touch $@

# kubelet + pycrio + runc end to end (tests/kubelet/), with a pycrio, CNI bridge and cgroups of its own.
kubelet-e2e: install kubelet
	$(PY) -m pytest -q tests/kubelet

# Headless Chromium takes the demo's screenshot and runs the browser tests.
browser:
	@command -v chromium >/dev/null || { echo "apt: installing chromium"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core; }

# critest, the CRI validation suite, is a Go *test* binary (`go install` refuses it): compiled with
# `go test -c` in a writable copy of the pinned cri-tools module.
critest: $(VENV)/.critest-$(CRI_TOOLS_VERSION)
$(VENV)/.critest-$(CRI_TOOLS_VERSION): | $(PY)
	@dir=$$(go mod download -json sigs.k8s.io/cri-tools@$(CRI_TOOLS_VERSION) | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["Dir"])') && \
	rm -rf build/cri-tools && mkdir -p build && cp -r "$$dir" build/cri-tools && chmod -R u+w build/cri-tools && \
	echo "critest: compiling sigs.k8s.io/cri-tools/cmd/critest@$(CRI_TOOLS_VERSION) (a few minutes)" && \
	cd build/cri-tools && go test -c -o $(BIN)/critest \
	  -ldflags '-X sigs.k8s.io/cri-tools/pkg/version.Version=$(CRI_TOOLS_VERSION)' ./cmd/critest && \
	cd ../.. && rm -rf build/cri-tools && touch $@

# critest against pycrio (or PEER=containerd), offline: stand-in images in a loopback registry
# served as mirrors; fails on a failure tests/conformance/EXPECTED.md does not list.
conformance: install critest $(if $(filter containerd,$(PEER)),peer-containerd-bin)
	$(PY) tests/conformance/run.py $(if $(PEER),--peer $(PEER)) $(if $(RUNTIME_TYPE),--runtime-type $(RUNTIME_TYPE)) $(CONFORMANCE_ARGS)

# What a failed or killed test run left on the host (mounts, processes, cgroups, bridges,
# iptables rules, IPAM state), recognised by the tests' naming conventions; nothing else.
clean-test-state:
	$(PY) tests/clean_test_state.py

# tests/kubelet needs the kubelet build: `make kubelet-e2e`
test: install
	$(PY) -m pytest -q tests --ignore=tests/kubelet

# Without Chromium the demo still runs (it says how to get the picture).
demo: install jaeger
	@$(MAKE) --no-print-directory browser || echo "demo: could not install chromium; going on without the screenshot"
	$(PY) contrib/demo.py $(DEMO_ARGS)

bench: install
	$(MAKE) jaeger && $(PY) bench/tracing_overhead.py $(BENCH_ARGS)

clean:
	rm -rf build $(CRI_OUT)/api_pb2*.py $(CRI_OUT)/api_pb2*.pyi

# containerd v2.4.2 as a peer runtime (tests/conformance/peer_containerd.py): installs containerd and
# its runc shim from the Go module proxy (~5 min cold), then starts one with everything under
# build/peer-containerd (own sockets, runc root, CNI bridge ctrdpeer0, a pause image of our own in a
# registry of its own) and prints its endpoint. PEER_ARGS: e.g. --mirror HOST=127.0.0.1:PORT/HOST.
# `make peer-containerd-stop` removes its pods and host state and stops it.
CONTAINERD_VERSION := v2.4.2
.PHONY: peer-containerd peer-containerd-bin peer-containerd-stop
peer-containerd: install peer-containerd-bin
	$(PY) -m tests.conformance.peer_containerd start --dir build/peer-containerd $(PEER_ARGS)
peer-containerd-bin: $(VENV)/.containerd-$(CONTAINERD_VERSION)
$(VENV)/.containerd-$(CONTAINERD_VERSION): | $(PY)
	GOBIN=$(BIN) go install github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD_VERSION) \
	  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$(CONTAINERD_VERSION)
	touch $@
peer-containerd-stop:
	$(PY) -m tests.conformance.peer_containerd stop --dir build/peer-containerd
