"""bench/span_instructions.py counts what it says: each mode's calls make the spans it names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "span_instructions.py"
CALLS = 20


@pytest.mark.parametrize(
    "mode, spans, events",
    [("off", 0, 0), ("rate0", 0, 0), ("traced", CALLS, 0), ("eager", CALLS, 0), ("traced-log", CALLS, CALLS),
     ("steps", CALLS * 4, CALLS), ("steps-make", CALLS * 4, CALLS),
     ("root", CALLS, 0), ("make", CALLS, 0), ("encode", CALLS, 0)],
)
def test_each_mode_makes_the_spans_it_names(mode: str, spans: int, events: int) -> None:
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "3600000", "OTEL_BSP_MAX_QUEUE_SIZE": "100000",
           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100000", "PYCRIO_TRACING_RELAY": "off", "SPAN_INSTRUCTIONS_REPORT": "1"}  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(BENCH), "--child", mode, str(CALLS)], capture_output=True, text=True, env=env, timeout=60,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert f"spans queued: {spans}, log events: {events}" in run.stdout


def test_an_unknown_mode_is_refused_with_the_list() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--modes", "traced,bogus"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)  # fmt: skip
    assert run.returncode == 2 and "unknown modes: bogus" in run.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("valgrind") is None, reason="needs root (pods) and valgrind")
def test_daemon_pod_lives_are_counted_and_a_traced_life_costs_more(tmp_path: Path) -> None:
    """`--daemon-pods`: a real daemon under callgrind runs real pod lives (registry, CNI, runc,
    conmon); each life is counted alone, and a traced one does the untraced one's work plus its spans'."""
    out = tmp_path / "pods.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--modes", "", "--daemon-pods", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    row = json.loads(out.read_text())["daemon_pod_lives"]["now"]
    assert row["lives"] == 3
    # A pod life is tens of millions of instructions in the daemon; its spans add a few percent
    # (the quietest lives compared: a collection of the GC's in one moves it by about as much).
    assert row["untraced"] > 5_000_000
    assert 0 < row["extra_min"] < row["untraced"] * 0.2
    assert "whole daemon, instructions per pod life" in run.stdout
    assert subprocess.run(["ip", "link", "show", "pycriosib0"], capture_output=True, check=False).returncode != 0  # cleaned up
