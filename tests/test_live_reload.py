"""SIGHUP: the daemon re-reads its files and applies tracing and log level without a restart."""

from __future__ import annotations

import signal
import threading
import time

import grpc

from pycrio.cri import api_pb2
from tests.harness import PycrioDaemon
from tests.otlp_receiver import OTLPReceiver

VERSION = "/runtime.v1.RuntimeService/Version"
LIST_CONTAINERS = "/runtime.v1.RuntimeService/ListContainers"


def tracing_file(endpoint: str, rate: int = 1_000_000, extra: str = "") -> str:
    return (
        "[pycrio.tracing]\n"
        "enable_tracing = true\n"
        f'tracing_endpoint = "{endpoint}"\n'
        f"tracing_sampling_rate_per_million = {rate}\n"
        f"{extra}"
    )


def hup(daemon: PycrioDaemon, expect: str, timeout: float = 15.0) -> str:
    """Send SIGHUP and wait until the daemon logs the reload's outcome (`expect`)."""
    before = daemon.logs().count(expect)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = daemon.logs()
        if logs.count(expect) > before:
            return logs
        time.sleep(0.05)
    raise AssertionError(f"{expect!r} not logged after SIGHUP:\n{daemon.logs()[-3000:]}")


def calls(daemon: PycrioDaemon, n: int, method: str = "Version") -> None:
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for _ in range(n):
            if method == "Version":
                stub.Version(api_pb2.VersionRequest(), timeout=5)
            else:
                stub.ListContainers(api_pb2.ListContainersRequest(), timeout=5)


def test_sighup_moves_spans_to_the_new_endpoint_and_rates(make_daemon) -> None:
    with OTLPReceiver() as first, OTLPReceiver() as second:
        daemon = make_daemon(config_text=tracing_file(first.endpoint))
        calls(daemon, 5)
        assert len(first.wait_for(lambda s: s.name == VERSION, count=6)) >= 6  # with the start-up probe

        (daemon.config_dir / "50-tracing.conf").write_text(
            tracing_file(second.endpoint, 0, "[pycrio.tracing.sampling_overrides]\nVersion = 1000000\n")
        )
        logs = hup(daemon, "configuration reloaded from")
        assert "pycrio.tracing.tracing_endpoint" in logs and "applied" in logs
        first.clear()
        calls(daemon, 20, "Version")
        calls(daemon, 20, "ListContainers")
        assert len(second.wait_for(lambda s: s.name == VERSION, count=20)) == 20
        time.sleep(1.0)  # a few schedule delays: anything wrongly sampled would have arrived
        assert second.spans(lambda s: s.name == LIST_CONTAINERS) == []  # rate 0 for them now
        assert first.spans() == []

        status = daemon.runtime().Status(api_pb2.StatusRequest(verbose=True), timeout=5)
        assert f'"endpoint": "{second.endpoint}"' in status.info["tracing"]


def test_broken_dropin_keeps_the_running_configuration(make_daemon) -> None:
    with OTLPReceiver() as receiver:
        daemon = make_daemon(config_text=tracing_file(receiver.endpoint))
        assert receiver.wait_for(lambda s: s.name == VERSION)  # the start-up probe
        broken = daemon.config_dir / "60-broken.conf"
        broken.write_text("[pycrio.tracing]\ntracing_sampling_rate_per_million = 5000000\n")
        logs = hup(daemon, "configuration reload rejected")
        line = next(l for l in logs.splitlines() if "configuration reload rejected" in l)
        assert f"{broken}: pycrio.tracing.tracing_sampling_rate_per_million: must be between 0 and 1000000" in line
        assert "level=error" in line

        receiver.clear()
        calls(daemon, 10)
        assert len(receiver.wait_for(lambda s: s.name == VERSION, count=10)) == 10  # old rate, old endpoint

        broken.write_text("[pycrio.tracing\n")  # a TOML syntax error
        logs = hup(daemon, "configuration reload rejected")
        line = [l for l in logs.splitlines() if "configuration reload rejected" in l][-1]
        assert f"{broken}: " in line and "line 1" in line
        assert daemon.alive()

        broken.write_text("[pycrio]\nlog_level = \"debug\"\n")
        hup(daemon, "configuration reloaded from")
        calls(daemon, 1)
        assert "level=debug msg=\"Request: VersionRequest" in daemon.logs()


def test_disable_and_enable_tracing_live(make_daemon) -> None:
    with OTLPReceiver() as receiver:
        daemon = make_daemon(config_text=tracing_file(receiver.endpoint))
        assert receiver.wait_for(lambda s: s.name == VERSION)  # the start-up probe
        dropin = daemon.config_dir / "70-off.conf"
        dropin.write_text("[pycrio.tracing]\nenable_tracing = false\n")
        assert "tracing disabled" in hup(daemon, "configuration reloaded from")
        receiver.clear()
        calls(daemon, 10)
        time.sleep(1.0)
        assert receiver.spans() == []

        dropin.unlink()
        hup(daemon, "configuration reloaded from")
        calls(daemon, 10)
        assert len(receiver.wait_for(lambda s: s.name == VERSION, count=10)) == 10


def test_restart_only_keys_are_named(make_daemon) -> None:
    daemon = make_daemon()
    (daemon.config_dir / "80-image.conf").write_text('[pycrio.image]\nplatform = "linux/arm64"\n')
    logs = hup(daemon, "configuration reloaded from")
    assert "pycrio.image.platform changed; applied at the next restart" in logs
    assert "no live change" in logs


def test_no_span_is_lost_across_reloads_under_load(make_daemon) -> None:
    """Calls run on four threads while the endpoint flips three times: every call succeeds and
    every call's span reaches one of the two receivers."""
    with OTLPReceiver() as first, OTLPReceiver() as second:
        daemon = make_daemon(config_text=tracing_file(first.endpoint))
        assert first.wait_for(lambda s: s.name == VERSION)
        first.clear()
        done = threading.Event()
        counts: list[int] = []
        errors: list[grpc.RpcError] = []

        def worker() -> None:
            n = 0
            with daemon.channel() as ch:
                stub = daemon.runtime(ch)
                while not done.is_set():
                    try:
                        stub.ListContainers(api_pb2.ListContainersRequest(), timeout=10)
                        n += 1
                    except grpc.RpcError as exc:
                        errors.append(exc)
            counts.append(n)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        dropin = daemon.config_dir / "50-endpoint.conf"
        try:
            for target in (second, first, second):
                time.sleep(0.7)
                dropin.write_text(tracing_file(target.endpoint))
                hup(daemon, "configuration reloaded from")
            time.sleep(0.7)
        finally:
            done.set()
            for t in threads:
                t.join()
        total = sum(counts)
        assert errors == [] and total > 100

        def received() -> int:
            return len(first.spans(lambda s: s.name == LIST_CONTAINERS)) + len(
                second.spans(lambda s: s.name == LIST_CONTAINERS)
            )

        deadline = time.monotonic() + 20
        while received() < total and time.monotonic() < deadline:
            time.sleep(0.2)
        assert received() == total
        assert second.spans(lambda s: s.name == LIST_CONTAINERS) and first.spans(lambda s: s.name == LIST_CONTAINERS)


def test_flags_given_at_start_still_win_and_are_named(make_daemon) -> None:
    with OTLPReceiver() as receiver:
        daemon = make_daemon(
            config_text=tracing_file(receiver.endpoint), args=["--tracing-sampling-rate-per-million", "1000000"]
        )
        assert receiver.wait_for(lambda s: s.name == VERSION)  # the start-up probe
        (daemon.config_dir / "50-rate.conf").write_text("[pycrio.tracing]\ntracing_sampling_rate_per_million = 0\n")
        logs = hup(daemon, "configuration reloaded from")
        assert (
            "still winning over the files: pycrio.tracing.tracing_sampling_rate_per_million "
            "(--tracing-sampling-rate-per-million)" in logs
        )
        receiver.clear()
        calls(daemon, 5)
        assert len(receiver.wait_for(lambda s: s.name == VERSION, count=5)) == 5
