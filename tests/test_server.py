"""The CRI server: socket handling, every CRI method registered, real answers, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import grpc
import pytest

from pycrio.cri import api_pb2
from pycrio.server.services import HANDLERS, IMAGE_SERVICE, RUNTIME_SERVICE, cri_methods
from tests.harness import PycrioDaemon, drain_startup_probe, run_pycrio, tracing_args

# Every method of cri-api v0.37.2, as the pinned api.proto declares them.
EXPECTED_RUNTIME_METHODS = 37
EXPECTED_IMAGE_METHODS = 6


def _raw_call(channel: grpc.Channel, service: str, method: str, streaming: bool) -> grpc.StatusCode:
    """Call any method with an empty request; the status it answers with."""
    path = f"/{service}/{method}"
    try:
        if streaming:
            list(channel.unary_stream(path)(b"", timeout=2))
        else:
            channel.unary_unary(path)(b"", timeout=5)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            assert path in err.details(), err.details()  # the message names the method
        return err.code()
    return grpc.StatusCode.OK


def test_every_cri_method_is_registered(make_daemon) -> None:
    daemon = make_daemon()
    descriptor = api_pb2.DESCRIPTOR
    assert len(cri_methods(RUNTIME_SERVICE)) == EXPECTED_RUNTIME_METHODS
    assert len(cri_methods(IMAGE_SERVICE)) == EXPECTED_IMAGE_METHODS
    codes: dict[str, grpc.StatusCode] = {}
    with daemon.channel() as ch:
        for service in (RUNTIME_SERVICE, IMAGE_SERVICE):
            for m in descriptor.services_by_name[service.rsplit(".", 1)[1]].methods:
                codes[f"{service}/{m.name}"] = _raw_call(ch, service, m.name, m.server_streaming)
    for name, code in codes.items():
        service, method = name.rsplit("/", 1)
        if method == "GetContainerEvents":
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # an event stream stays open until the client leaves
        elif method in HANDLERS[service]:
            # Implemented: answers for real (the empty store makes *Status/*Stats by id invalid).
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (name, code)
        else:
            assert code == grpc.StatusCode.UNIMPLEMENTED, (name, code)
    implemented = [n for n, c in codes.items() if c != grpc.StatusCode.UNIMPLEMENTED]
    for required in ("Version", "Status", "RuntimeConfig", "UpdateRuntimeConfig", "ListPodSandbox",
                     "ListContainers", "ListContainerStats", "ListPodSandboxStats", "StreamPodSandboxes",
                     "StreamContainers", "StreamContainerStats", "StreamPodSandboxStats"):
        assert f"{RUNTIME_SERVICE}/{required}" in implemented
    for required in ("ListImages", "ImageFsInfo", "StreamImages", "PullImage", "RemoveImage", "ImageStatus"):
        assert f"{IMAGE_SERVICE}/{required}" in implemented


def test_streaming_lists_end_cleanly_on_an_empty_node(make_daemon) -> None:
    daemon = make_daemon()
    with daemon.channel() as ch:
        rt, img = daemon.runtime(ch), daemon.images(ch)
        assert list(rt.StreamPodSandboxes(api_pb2.StreamPodSandboxesRequest(), timeout=5)) == []
        assert list(rt.StreamContainers(api_pb2.StreamContainersRequest(), timeout=5)) == []
        assert list(rt.StreamContainerStats(api_pb2.StreamContainerStatsRequest(), timeout=5)) == []
        assert list(rt.StreamPodSandboxStats(api_pb2.StreamPodSandboxStatsRequest(), timeout=5)) == []
        assert list(img.StreamImages(api_pb2.StreamImagesRequest(), timeout=5)) == []


def test_streaming_call_is_one_span(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint))
    drain_startup_probe(receiver)
    with daemon.channel() as ch:
        list(daemon.runtime(ch).StreamContainers(api_pb2.StreamContainersRequest(), timeout=5))
    [span] = receiver.wait_for(lambda s: s.name == "/runtime.v1.RuntimeService/StreamContainers")
    assert span.attributes["rpc.method"] == "StreamContainers"
    assert span.attributes["rpc.grpc.status_code"] == 0


def test_version_status_and_runtime_config(make_daemon) -> None:
    daemon = make_daemon()
    with daemon.channel() as ch:
        rt = daemon.runtime(ch)
        v = rt.Version(api_pb2.VersionRequest(version="v1"), timeout=5)
        assert (v.runtime_name, v.runtime_api_version) == ("pycrio", "v1")
        from pycrio import __version__

        assert v.runtime_version == __version__
        status = rt.Status(api_pb2.StatusRequest(verbose=True), timeout=5)
        ready = {c.type: c for c in status.status.conditions}
        assert ready["RuntimeReady"].status is True
        assert json.loads(status.info["config"])["root"] == str(daemon.base / "root")
        assert rt.Status(api_pb2.StatusRequest(), timeout=5).info == {}
        cfg = rt.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=5)
        assert cfg.linux.cgroup_driver == api_pb2.CgroupDriver.CGROUPFS
        rt.UpdateRuntimeConfig(
            api_pb2.UpdateRuntimeConfigRequest(
                runtime_config=api_pb2.RuntimeConfig(network_config=api_pb2.NetworkConfig(pod_cidr="10.88.0.0/16"))
            ),
            timeout=5,
        )
        status = rt.Status(api_pb2.StatusRequest(verbose=True), timeout=5)
        assert json.loads(status.info["daemon"])["pod_cidr"] == "10.88.0.0/16"


def test_bad_requests_get_clear_statuses(make_daemon) -> None:
    daemon = make_daemon()
    with daemon.channel() as ch:
        rt, img = daemon.runtime(ch), daemon.images(ch)
        for call, request, code, text in [
            (rt.ContainerStatus, api_pb2.ContainerStatusRequest(), grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
            (rt.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id="p1"), grpc.StatusCode.NOT_FOUND,
             "pod sandbox 'p1' not found"),
            (rt.ContainerStats, api_pb2.ContainerStatsRequest(container_id="c1"), grpc.StatusCode.NOT_FOUND,
             "container 'c1' not found"),
            (img.ImageStatus, api_pb2.ImageStatusRequest(), grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
            (rt.RunPodSandbox, api_pb2.RunPodSandboxRequest(), grpc.StatusCode.INVALID_ARGUMENT,
             "metadata must have name, namespace and uid"),
            (rt.CheckpointContainer, api_pb2.CheckpointContainerRequest(), grpc.StatusCode.UNIMPLEMENTED,
             "/runtime.v1.RuntimeService/CheckpointContainer is not implemented"),
            (img.PullImage, api_pb2.PullImageRequest(), grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
            (rt.CreateContainer, api_pb2.CreateContainerRequest(), grpc.StatusCode.INVALID_ARGUMENT,
             "must have metadata with a name"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() == code
            assert text in err.value.details()
        # An image that is not there is an empty answer, not an error.
        assert not img.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image="busybox")), timeout=5
        ).HasField("image")
        assert daemon.version().runtime_name == "pycrio"  # still serving


def test_image_fs_info_reports_real_usage(make_daemon) -> None:
    daemon = make_daemon()
    with daemon.channel() as ch:
        img = daemon.images(ch)
        before = img.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=5).image_filesystems[0]
        blob = daemon.base / "root" / "storage" / "blob"
        blob.write_bytes(os.urandom(3 * 1024 * 1024))
        after = img.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=5).image_filesystems[0]
    assert after.fs_id.mountpoint == str(daemon.base / "root" / "storage")
    assert after.used_bytes.value - before.used_bytes.value >= 3 * 1024 * 1024
    assert after.inodes_used.value == before.inodes_used.value + 1


def test_socket_mode_and_stale_socket_replaced(make_daemon, tmp_path) -> None:
    daemon = make_daemon(start=False, name="stale")
    daemon.socket.parent.mkdir(parents=True, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(daemon.socket))  # bound, never listening: what a crashed daemon leaves
    stale.close()
    daemon.start()
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660
    assert "removing stale socket" in daemon.logs()


def test_socket_parent_directory_is_created(tmp_path) -> None:
    daemon = PycrioDaemon(tmp_path / "d")
    daemon.socket = tmp_path / "deep" / "er" / "pycrio.sock"
    try:
        daemon.start()
        assert daemon.version().runtime_name == "pycrio"
    finally:
        daemon.stop()


def test_refuses_to_start_over_a_live_daemon(make_daemon) -> None:
    first = make_daemon(name="first")
    second = make_daemon(start=False, name="second")
    second.socket = first.socket
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    assert "another daemon is already serving on" in second.logs()
    assert first.version().runtime_name == "pycrio"  # the first one is untouched


def test_refuses_a_path_that_is_not_a_socket(tmp_path) -> None:
    target = tmp_path / "file.sock"
    target.write_text("precious")
    result = run_pycrio("--config", "/dev/null", "--listen", str(target), "--root", str(tmp_path / "r"),
                        "--runroot", str(tmp_path / "rr"))
    assert result.returncode == 1
    assert "exists and is not a socket" in result.stderr
    assert target.read_text() == "precious"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_spans_and_removes_the_socket(make_daemon, receiver, sig) -> None:
    # A long batch delay: nothing is exported before the signal, so only the flush can deliver.
    daemon = make_daemon(args=tracing_args(receiver.endpoint), env={"OTEL_BSP_SCHEDULE_DELAY": "60000"})
    with daemon.channel() as ch:
        for _ in range(25):
            daemon.runtime(ch).ListContainers(api_pb2.ListContainersRequest(), timeout=5)
    assert receiver.spans() == []
    assert daemon.stop(sig) == 0
    assert not daemon.socket.exists()
    spans = receiver.settle(quiet=0.3)
    assert len([s for s in spans if s.name == "/runtime.v1.RuntimeService/ListContainers"]) == 25


def test_tracing_disabled_exports_nothing_even_for_sampled_callers(make_daemon, receiver) -> None:
    daemon = make_daemon()  # tracing off (the default)
    daemon.crictl("ps", tracing_endpoint=receiver.endpoint)
    assert daemon.stop() == 0
    spans = receiver.settle(quiet=0.5)
    assert spans and all(s.service == "cri-tools" for s in spans)


def test_network_ready_follows_the_cni_configuration(make_daemon, tmp_path) -> None:
    empty = tmp_path / "empty-net.d"
    empty.mkdir()
    daemon = make_daemon(config_text=f'[pycrio.network]\nnetwork_dir = "{empty}"\n', name="nonet")
    with daemon.channel() as ch:
        conditions = {c.type: c for c in daemon.runtime(ch).Status(api_pb2.StatusRequest(), timeout=5).status.conditions}
    assert conditions["NetworkReady"].status is False
    assert conditions["NetworkReady"].reason == "NetworkPluginNotReady"
    assert str(empty) in conditions["NetworkReady"].message
    (empty / "10-net.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge", "bridge": "pycriotest8",
                                                          "ipam": {"type": "host-local", "subnet": "10.130.0.0/24"}}]}))
    with daemon.channel() as ch:
        conditions = {c.type: c for c in daemon.runtime(ch).Status(api_pb2.StatusRequest(), timeout=5).status.conditions}
    assert conditions["NetworkReady"].status is True


def test_an_idle_daemon_does_not_burn_cpu(make_daemon) -> None:
    """Background work (the exit watcher, span and metric exporters) sleeps between rounds: over 3 s
    of idling the daemon uses a small fraction of the CPU time a spinning thread would (3 s)."""
    daemon = make_daemon(args=["--enable-tracing", "--tracing-sampling-rate-per-million", "1000000"])
    assert daemon.proc is not None
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    time.sleep(1.0)  # start-up is over
    before = cpu_seconds()
    time.sleep(3.0)
    assert cpu_seconds() - before < 0.3
