"""Start a real pycrio daemon on a temp socket with temp dirs, and drive it with real crictl."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from pycrio.cri import api_pb2, api_pb2_grpc
from tests.otlp_receiver import OTLPReceiver

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


def tool(name: str) -> str:
    """A Go-built tool from .venv/bin (where `make install` puts them), else from PATH."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: run `make install`")
    return found


def pycrio_command() -> list[str]:
    return [sys.executable, "-m", "pycrio"]


class PycrioDaemon:
    """One daemon with its own socket, root, runroot, config file and drop-in dir."""

    def __init__(
        self,
        base: Path,
        args: list[str] | None = None,
        config_text: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.socket = base / "pycrio.sock"
        self.config_file = base / "pycrio.conf"
        self.config_dir = base / "conf.d"
        self.config_dir.mkdir(exist_ok=True)
        self.registries_conf = base / "registries.conf"
        self.registries_conf_dir = base / "registries.conf.d"
        self.config_file.write_text(own_registries_conf(config_text, self.registries_conf, self.registries_conf_dir))
        self.log_file = base / "pycrio.log"
        self.args = args or []
        self.env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def command(self, *extra: str) -> list[str]:
        return [
            *pycrio_command(),
            "--config", str(self.config_file),
            "--config-dir", str(self.config_dir),
            "--listen", str(self.socket),
            "--root", str(self.base / "root"),
            "--runroot", str(self.base / "run"),
            *self.args,
            *extra,
        ]

    def start(self, timeout: float = 15.0) -> "PycrioDaemon":
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pycrio exited with {self.proc.returncode}:\n{self.logs()}")
            # Our own process must say it serves: another daemon may answer on a shared socket.
            if self.socket.exists() and "serving CRI v1 on" in self.logs()[offset:]:
                try:
                    self.version(timeout=1.0)
                    return self
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"pycrio did not answer on {self.socket} within {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """The whole log once `text` appears in it; AssertionError with the log tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.logs()
            if text in logs:
                return logs
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.logs()[-3000:]}")

    def worker_processes(self) -> list[int]:
        """Pids of this daemon's multiprocessing helpers (forkserver, unpack workers): the
        processes running multiprocessing code whose stderr is this daemon's log file."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if b"multiprocessing" not in (entry / "cmdline").read_bytes():
                    continue
                if os.readlink(entry / "fd" / "2") == str(self.log_file):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # --- clients ---------------------------------------------------------------------------

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.endpoint)

    def runtime(self, channel: grpc.Channel | None = None) -> api_pb2_grpc.RuntimeServiceStub:
        return api_pb2_grpc.RuntimeServiceStub(channel or self.channel())

    def images(self, channel: grpc.Channel | None = None) -> api_pb2_grpc.ImageServiceStub:
        return api_pb2_grpc.ImageServiceStub(channel or self.channel())

    def version(self, timeout: float = 5.0) -> api_pb2.VersionResponse:
        with self.channel() as ch:
            return self.runtime(ch).Version(api_pb2.VersionRequest(), timeout=timeout)

    def crictl(self, *args: str, tracing_endpoint: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real crictl against this daemon (no crictl.yaml needed)."""
        cmd = [tool("crictl"), "--runtime-endpoint", self.endpoint, "--image-endpoint", self.endpoint, "--timeout", "10s"]
        if tracing_endpoint:
            cmd += ["--enable-tracing", "--tracing-endpoint", tracing_endpoint]
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


def own_registries_conf(config_text: str, conf: Path, conf_dir: Path) -> str:
    """`config_text` with registries_conf(_dir) in the daemon's own dir (missing until a test writes
    them) unless it sets them: the host's /etc/containers files must not change a test."""
    if "registries_conf" in config_text:
        return config_text
    keys = f'registries_conf = "{conf}"\nregistries_conf_dir = "{conf_dir}"\n'
    if "[pycrio.image]\n" in config_text:
        return config_text.replace("[pycrio.image]\n", "[pycrio.image]\n" + keys, 1)
    separator = "\n" if config_text and not config_text.endswith("\n") else ""
    return f"{config_text}{separator}[pycrio.image]\n{keys}"


def run_pycrio(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a short pycrio command (config, version, a daemon expected to fail) and capture it."""
    return subprocess.run(
        [*pycrio_command(), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def metadata_with_parent(trace_id: str, span_id: str, sampled: bool = True) -> list[tuple[str, str]]:
    """gRPC metadata carrying a W3C traceparent, as kubelet sends it."""
    return [("traceparent", f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}")]




def tracing_args(endpoint: str, rate: int = 1_000_000, level: str = "info") -> list[str]:
    """Daemon flags for tracing to `endpoint` at `rate` per million."""
    return [
        "--enable-tracing",
        "--tracing-endpoint", endpoint,
        "--tracing-sampling-rate-per-million", str(rate),
        "--log-level", level,
    ]


def drain_startup_probe(receiver: OTLPReceiver) -> None:
    """Wait for the span of the harness's start-up Version call, then forget it."""
    assert receiver.wait_for(lambda s: s.service == "pycrio"), "no span for the start-up probe"
    receiver.clear()
