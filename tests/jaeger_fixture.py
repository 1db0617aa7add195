"""The real Jaeger (contrib/jaeger.yaml, the UI from build/jaeger-ui) and headless Chromium.

- JaegerInstance runs `.venv/bin/jaeger --config contrib/jaeger.yaml` with every address moved to
  a free loopback port, so it never collides with a demo's Jaeger or a Collector on this machine.
- debug_span_block finds one span in the debug exporter's printout on Jaeger's log.
- find_chromium / chromium render a page of the single-page UI (`--dump-dom`, `--screenshot`).

`make demo` (contrib/demo.py) uses the same parsing and browser helpers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.registry_fixture import free_port

ROOT = Path(__file__).resolve().parent.parent
JAEGER_BIN = ROOT / ".venv" / "bin" / "jaeger"
JAEGER_CONFIG = ROOT / "contrib" / "jaeger.yaml"
UI_ASSETS = ROOT / "build" / "jaeger-ui"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# What a Jaeger without UI assets serves on every UI route.
UI_PLACEHOLDER_MARK = "This is not the Jaeger UI you are looking for"

# The debug exporter's span header fields (`    Trace ID       : 4bf9...`) and the start of a log line.
_DEBUG_FIELD = re.compile(r"^\s+(Trace ID|Parent ID|ID|Name|Kind)\s*: (.*)$")
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT")
_BLOCK_STARTS = ("ResourceSpans #", "ScopeSpans #", "Span #")


def debug_span_block(log_text: str, trace_id: str, name: str) -> str | None:
    """The debug exporter's `Span #N` block (header, attributes, events) of span `name` in `trace_id`.

    The exporter logs each batch as one multi-line message of `ResourceSpans #i`, `ScopeSpans #j`
    and `Span #k` blocks; a span's block ends where the next block or the next log line starts.
    """
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in log_text.splitlines():
        if line.startswith("Span #"):
            current = [line]
            blocks.append(current)
        elif current is not None and (line.startswith(_BLOCK_STARTS) or _LOG_LINE.match(line)):
            current = None
        elif current is not None:
            current.append(line)
    for block in blocks:
        fields = dict(m.groups() for line in block[1:8] if (m := _DEBUG_FIELD.match(line)))
        if fields.get("Trace ID") == trace_id and fields.get("Name") == name:
            return "\n".join(block).rstrip()
    return None


def find_chromium() -> str | None:
    """Debian's `chromium` (or another Chromium/Chrome) on PATH."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def chromium(url: str, *mode: str, width: int = 1400, height: int = 900, timeout: float = 90.0) -> str:
    """Render `url` in headless Chromium, letting the single-page app run for 10 s of virtual time.

    `mode` is `--dump-dom` (the rendered DOM is returned) or `--screenshot=FILE`.
    """
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("chromium not found: `make browser` (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="pycrio-chromium-") as profile:
        argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "--virtual-time-budget=10000", *mode, url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"chromium failed on {url} ({done.returncode}): {last}")
    return done.stdout


def jaeger_missing() -> str | None:
    """Why the Jaeger UI tests cannot run here (None when they can)."""
    if not JAEGER_BIN.is_file():
        return f"{JAEGER_BIN} not built (make jaeger)"
    if not (UI_ASSETS / "index.html").is_file():
        return f"{UI_ASSETS} missing (make jaeger)"
    if find_chromium() is None:
        return "chromium not installed (make browser)"
    return None


class JaegerInstance:
    """One Jaeger process on its own loopback ports, configured by contrib/jaeger.yaml."""

    __test__ = False

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "jaeger.log"
        self.otlp_grpc = f"127.0.0.1:{free_port()}"
        self.ui = f"127.0.0.1:{free_port()}"
        self.env = {
            "PYCRIO_JAEGER_OTLP_GRPC": self.otlp_grpc,
            "PYCRIO_JAEGER_OTLP_HTTP": f"127.0.0.1:{free_port()}",
            "PYCRIO_JAEGER_UI_HTTP": self.ui,
            "PYCRIO_JAEGER_QUERY_GRPC": f"127.0.0.1:{free_port()}",
            "PYCRIO_JAEGER_UI_ASSETS": str(UI_ASSETS),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ui}"

    def start(self, timeout: float = 30.0) -> JaegerInstance:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(JAEGER_BIN), "--config", str(JAEGER_CONFIG)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env={**env, **self.env})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jaeger exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if "data" in self.get_json("/api/services"):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jaeger did not answer on {self.url} within {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return json.load(resp)

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return resp.read().decode(errors="replace")

    def wait_for_trace(self, service: str, operation: str, *, holding: tuple[str, ...] = (),
                       timeout: float = 30.0) -> dict[str, Any]:
        """The first stored trace of `service` whose root operation is `operation`, once it holds
        spans of every service in `holding` and its span count has stopped growing: Jaeger's batch
        processor stores each sender's spans up to 200 ms apart, so the caller's trace is found
        before the callee's spans are in it."""
        deadline = time.monotonic() + timeout
        seen = -1
        while True:
            answer = self.get_json(f"/api/traces?service={service}&operation={operation}&lookback=1h&limit=5")
            for trace in answer.get("data") or []:
                services = {p["serviceName"] for p in trace["processes"].values()}
                if not set(holding) <= services:
                    continue
                if len(trace["spans"]) == seen:
                    return trace
                seen = len(trace["spans"])
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"no trace of {service} {operation} holding {holding} in Jaeger after {timeout}s")
            time.sleep(0.3)

    def __enter__(self) -> JaegerInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
