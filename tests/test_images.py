"""ImageService for real: the real crictl pulls from a real docker-registry into pycrio's store."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from pycrio.config import Config
from pycrio.cri import api_pb2
from pycrio.images import ImageManager
from tests.harness import PycrioDaemon, tracing_args
from tests.otlp_receiver import STATUS_ERROR, OTLPReceiver
from tests.registry_fixture import AUTH_USER, ImageBuilder, TestRegistry

PULL = "/runtime.v1.ImageService/PullImage"


def image_config(*registries: TestRegistry, search: TestRegistry | None = None) -> str:
    insecure = ", ".join(f'"{r.address}"' for r in registries)
    text = f"[pycrio.image]\ninsecure_registries = [{insecure}]\n"
    if search is not None:
        text += f'unqualified_search_registries = ["{search.address}"]\n'
    return text


@pytest.fixture
def daemon(make_daemon, registry: TestRegistry, auth_registry: TestRegistry, receiver: OTLPReceiver) -> PycrioDaemon:
    return make_daemon(
        config_text=image_config(registry, auth_registry, search=registry),
        args=tracing_args(receiver.endpoint),
    )


def storage(daemon: PycrioDaemon) -> Path:
    return daemon.base / "root" / "storage"


def stored_blobs(daemon: PycrioDaemon) -> set[str]:
    return {f"sha256:{p.name}" for p in (storage(daemon) / "blobs" / "sha256").iterdir()}


def test_crictl_pull_images_inspecti_rmi(daemon: PycrioDaemon, image_builder: ImageBuilder) -> None:
    image = image_builder.busybox("crictl/busybox", "1.0")
    out = daemon.crictl("pull", image.reference).stdout
    assert f"Image is up to date for {image.config_digest}" in out

    listing = json.loads(daemon.crictl("images", "-o", "json").stdout)["images"]
    [entry] = listing
    assert entry["id"] == image.config_digest
    assert entry["repoTags"] == [image.reference]
    assert entry["repoDigests"] == [image.digest_reference]
    assert int(entry["size"]) == sum(image.layer_sizes) + (storage(daemon) / "blobs" / "sha256" / image.config_digest[7:]).stat().st_size
    table = daemon.crictl("images").stdout
    assert image.name in table and "1.0" in table

    inspect = json.loads(daemon.crictl("inspecti", image.reference).stdout)
    assert inspect["status"]["id"] == image.config_digest
    info = inspect["info"]  # crictl decodes each verbose info value as JSON
    assert info["imageSpec"]["config"]["Cmd"] == ["/bin/sh"]
    assert [layer["digest"] for layer in info["layers"]] == list(image.layers)

    fs_before = json.loads(daemon.crictl("imagefsinfo").stdout)["status"]["imageFilesystems"][0]
    assert int(fs_before["usedBytes"]["value"]) > sum(image.layer_sizes)  # blobs + unpacked layers

    daemon.crictl("rmi", image.reference)
    assert json.loads(daemon.crictl("images", "-o", "json").stdout)["images"] == []
    assert stored_blobs(daemon) == set()
    assert list((storage(daemon) / "layers").iterdir()) == []
    fs_after = json.loads(daemon.crictl("imagefsinfo").stdout)["status"]["imageFilesystems"][0]
    assert int(fs_after["usedBytes"]["value"]) < int(fs_before["usedBytes"]["value"]) - sum(image.layer_sizes)


def test_pull_by_digest_short_name_and_docker_format(daemon: PycrioDaemon, image_builder: ImageBuilder, registry) -> None:
    oci = image_builder.busybox("fmt/oci", "1")
    v2s2 = image_builder.busybox("fmt/docker", "1", fmt="v2s2")
    daemon.crictl("pull", oci.digest_reference)
    daemon.crictl("pull", v2s2.reference)
    daemon.crictl("pull", "fmt/oci:1")  # short name, resolved through the search registries
    images = json.loads(daemon.crictl("images", "-o", "json").stdout)["images"]
    # Same content (busybox layer and config) in both formats: one image, several names.
    by_id = {i["id"]: i for i in images}
    assert oci.config_digest in by_id
    assert set(by_id[oci.config_digest]["repoDigests"]) >= {oci.digest_reference}
    assert f"{registry.address}/fmt/oci:1" in by_id[oci.config_digest]["repoTags"]
    assert v2s2.reference in {t for i in images for t in i["repoTags"]}
    # The filter of ListImages takes the same names.
    filtered = json.loads(daemon.crictl("images", "-o", "json", "fmt/oci:1").stdout)["images"]
    assert [i["id"] for i in filtered] == [oci.config_digest]


def test_multi_arch_index_resolves_to_the_node_platform(daemon: PycrioDaemon, image_builder: ImageBuilder) -> None:
    image = image_builder.multi_arch("multi/arch", "1")
    daemon.crictl("pull", image.reference)
    [entry] = json.loads(daemon.crictl("images", "-o", "json", image.reference).stdout)["images"]
    assert entry["repoDigests"] == [f"{image.name}@{image.digest}"]  # the index digest, as kubelet expects
    arch_files = list((storage(daemon) / "layers").glob("*/etc/arch"))
    assert [p.read_text().strip() for p in arch_files] == ["amd64"]


def test_pull_again_uses_the_store_and_the_trace_shows_it(daemon, image_builder, receiver) -> None:
    image = image_builder.multi_layer("multi/layer", "1", layers=3, layer_size=256 * 1024)
    daemon.crictl("pull", image.reference, tracing_endpoint=receiver.endpoint)
    first = _pull_spans(receiver)
    assert first["root"].parent_span_id  # continues crictl's trace
    fetches = first["fetch_layer"]
    assert sorted(s.attributes["digest"] for s in fetches) == sorted(image.layers)
    assert all(s.attributes["cached"] is False for s in fetches)
    assert all(s.attributes["bytes_fetched"] == s.attributes["size"] for s in fetches)
    assert len(first["unpack_layer"]) == len(image.layers)
    for name in ("resolve", "fetch_layer", "unpack_layer", "commit"):
        for span in first[name]:
            assert span.parent_span_id == first["root"].span_id, name
            assert span.trace_id == first["root"].trace_id

    receiver.clear()
    daemon.crictl("pull", image.reference, tracing_endpoint=receiver.endpoint)
    second = _pull_spans(receiver)
    assert all(s.attributes["cached"] is True and s.attributes["bytes_fetched"] == 0 for s in second["fetch_layer"])
    assert second["unpack_layer"] == []


def _pull_spans(receiver: OTLPReceiver) -> dict:
    [root] = receiver.wait_for(lambda s: s.name == PULL)
    spans = receiver.settle(quiet=0.5)
    children = [s for s in spans if s.trace_id == root.trace_id and s.service == "pycrio"]
    grouped: dict = {"root": root}
    for name in ("resolve", "fetch_layer", "unpack_layer", "commit"):
        grouped[name] = [s for s in children if s.name == name]
    return grouped


def test_concurrent_pulls_of_one_image_fetch_once(daemon, image_builder, receiver) -> None:
    image = image_builder.multi_layer("multi/concurrent", "1", layers=3, layer_size=1024 * 1024)
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            with daemon.channel() as ch:
                daemon.images(ch).PullImage(
                    api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image.reference)), timeout=60
                )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    receiver.wait_for(lambda s: s.name == PULL, count=3)
    fetched = [s for s in receiver.settle(quiet=0.5) if s.name == "fetch_layer" and not s.attributes["cached"]]
    assert sorted(s.attributes["digest"] for s in fetched) == sorted(image.layers)  # each layer once


def test_partial_download_is_resumed(daemon, image_builder, receiver) -> None:
    image = image_builder.multi_layer("multi/resume", "1", layers=1, layer_size=2 * 1024 * 1024)
    big = max(range(len(image.layers)), key=lambda i: image.layer_sizes[i])
    digest, size = image.layers[big], image.layer_sizes[big]
    # What a pull killed half-way through this layer leaves behind.
    partial = storage(daemon) / "ingest" / f"{digest[7:]}.partial"
    partial.write_bytes(image_builder.registry.blob_path(digest).read_bytes()[: size // 2])
    daemon.crictl("pull", image.reference)
    [span] = [s for s in _pull_spans(receiver)["fetch_layer"] if s.attributes["digest"] == digest]
    assert span.attributes["bytes_fetched"] == size - size // 2
    assert not partial.exists()


def test_killed_pull_leaves_no_corrupt_image_and_the_next_pull_finishes(make_daemon, registry, image_builder) -> None:
    image = image_builder.multi_layer("multi/killed", "1", layers=4, layer_size=8 * 1024 * 1024)
    first = make_daemon(config_text=image_config(registry), name="killed")
    puller = threading.Thread(target=lambda: first.crictl("pull", image.reference, check=False))
    puller.start()
    ingest = storage(first) / "ingest"
    while not any(ingest.glob("*.partial")) and puller.is_alive():
        time.sleep(0.005)
    first.stop(sig=9)
    puller.join()
    again = PycrioDaemon(first.base, config_text=image_config(registry))
    try:
        again.start()
        listed = json.loads(again.crictl("images", "-o", "json").stdout)["images"]
        assert all(i["id"] == image.config_digest for i in listed)  # absent, or complete
        again.crictl("pull", image.reference)
        [entry] = json.loads(again.crictl("images", "-o", "json").stdout)["images"]
        assert entry["id"] == image.config_digest
        assert stored_blobs(again) >= set(image.layers)
        assert not list(ingest.glob("*.partial"))
    finally:
        again.stop()


def test_auth_registry_needs_credentials(daemon, auth_registry, image_builder) -> None:
    image = image_builder.busybox("private/busybox", "1", registry=auth_registry)
    denied = daemon.crictl("pull", image.reference, check=False)
    assert denied.returncode != 0
    assert "Unauthenticated" in denied.stderr and auth_registry.address in denied.stderr
    wrong = daemon.crictl("pull", "--creds", "alice:wrong", image.reference, check=False)
    assert wrong.returncode != 0 and "Unauthenticated" in wrong.stderr
    daemon.crictl("pull", "--creds", f"{AUTH_USER[0]}:{AUTH_USER[1]}", image.reference)
    daemon.crictl("rmi", image.reference)
    token = base64.b64encode(f"{AUTH_USER[0]}:{AUTH_USER[1]}".encode()).decode()
    daemon.crictl("pull", "--auth", token, image.reference)
    assert image.config_digest in daemon.crictl("images", "-q", "--no-trunc").stdout


@pytest.mark.parametrize(
    ("reference", "code", "text"),
    [
        ("{registry}/no/such:image", grpc.StatusCode.NOT_FOUND, "not found on registry {registry}"),
        ("{registry}/Bad/UPPER:case", grpc.StatusCode.INVALID_ARGUMENT, "Bad/UPPER"),
        ("{registry}/x:bad tag", grpc.StatusCode.INVALID_ARGUMENT, "bad tag"),
        ("127.0.0.1:1/down:1", grpc.StatusCode.UNAVAILABLE, "127.0.0.1:1"),
    ],
)
def test_bad_pulls_get_clear_errors_and_leave_nothing(make_daemon, registry, reference, code, text) -> None:
    daemon = make_daemon(config_text=image_config(registry) + '')
    reference = reference.format(registry=registry.address)
    with daemon.channel() as ch, pytest.raises(grpc.RpcError) as err:
        daemon.images(ch).PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=60)
    assert err.value.code() == code, err.value.details()
    assert text.format(registry=registry.address) in err.value.details()
    assert stored_blobs(daemon) == set()
    assert daemon.version().runtime_name == "pycrio"


def test_corrupted_blob_is_refused_and_nothing_is_kept(make_daemon, tmp_path_factory, image_builder) -> None:
    own = TestRegistry(tmp_path_factory.mktemp("corrupt-registry")).start()
    try:
        image = image_builder.busybox("corrupt/busybox", "1", registry=own)
        blob = own.blob_path(image.layers[0])
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, wrong content
        blob.write_bytes(bytes(data))
        daemon = make_daemon(config_text=image_config(own))
        with daemon.channel() as ch, pytest.raises(grpc.RpcError) as err:
            daemon.images(ch).PullImage(
                api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image.reference)), timeout=60
            )
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert image.layers[0] in err.value.details()
        assert image.layers[0] not in stored_blobs(daemon)
        assert not list((storage(daemon) / "ingest").glob("*.partial"))
        assert not list((storage(daemon) / "images").iterdir())
    finally:
        own.stop()


def test_failed_pull_marks_the_span(daemon, receiver, registry) -> None:
    result = daemon.crictl("pull", f"{registry.address}/no/such:thing", tracing_endpoint=receiver.endpoint, check=False)
    assert result.returncode != 0 and "NotFound" in result.stderr
    [span] = receiver.wait_for(lambda s: s.name == PULL)
    assert span.status_code == STATUS_ERROR
    [resolve] = receiver.wait_for(lambda s: s.name == "resolve")
    assert resolve.status_code == STATUS_ERROR


def test_rootfs_for_a_container(tmp_path, registry, image_builder) -> None:
    image = image_builder.multi_layer("multi/rootfs", "1", layers=2, layer_size=64 * 1024)
    config = Config()
    config.root = str(tmp_path / "root")
    config.image.insecure_registries = [registry.address]
    manager = ImageManager(config)
    manager.open()
    manager.puller.pull(image.reference)
    try:
        rootfs = manager.prepare_rootfs(image.reference, "c1")
        try:
            assert os.path.islink(rootfs / "bin" / "sh") and (rootfs / "bin" / "busybox").is_file()
            assert not (rootfs / "data" / "doomed.txt").exists()  # whiteout applied
            assert sorted(p.name for p in (rootfs / "replaced").iterdir()) == ["c.txt"]  # opaque dir
            (rootfs / "scratch").write_text("container writes stay in the container")
            layers = manager.store.layer_paths(manager.lookup(image.reference))
            assert not any((layer / "scratch").exists() for layer in layers)
        finally:
            manager.release_rootfs("c1")
        assert not (manager.containers_dir / "c1").exists()
        with pytest.raises(Exception, match="not present"):
            manager.prepare_rootfs("nothere:1", "c2")
    finally:
        manager.close()  # stops the unpack worker processes


def test_bearer_token_registry(make_daemon, token_registry, image_builder) -> None:
    image = image_builder.busybox("token/busybox", "1", registry=token_registry)
    daemon = make_daemon(config_text=image_config(token_registry))
    denied = daemon.crictl("pull", image.reference, check=False)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    daemon.crictl("pull", "--creds", f"{AUTH_USER[0]}:{AUTH_USER[1]}", image.reference)
    assert image.config_digest in daemon.crictl("images", "-q", "--no-trunc").stdout


def _pull(daemon: PycrioDaemon, reference: str, auth: api_pb2.AuthConfig) -> api_pb2.PullImageResponse:
    """PullImage over gRPC: crictl has no flags for identity or registry tokens (kubelet sends them)."""
    with daemon.channel() as ch:
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference), auth=auth)
        return daemon.images(ch).PullImage(request, timeout=60)


def test_registry_token_is_sent_as_bearer(make_daemon, token_registry, image_builder) -> None:
    image = image_builder.busybox("token/regtoken", "1", registry=token_registry)
    daemon = make_daemon(config_text=image_config(token_registry))
    server = token_registry.token
    assert server is not None
    scope = "repository:token/regtoken:pull"
    token = server.issue(AUTH_USER[0], [scope])  # what a credential provider hands kubelet
    asked = len(server.requests)
    assert _pull(daemon, image.reference, api_pb2.AuthConfig(registry_token=token)).image_ref == image.config_digest
    assert len(server.requests) == asked  # used as it is: the token server was not asked

    with pytest.raises(grpc.RpcError) as denied:
        _pull(daemon, image.reference, api_pb2.AuthConfig(registry_token="not-a-token"))
    assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "(registry token)" in (denied.value.details() or "")
    assert "not-a-token" not in (denied.value.details() or "")


def test_identity_token_is_traded_at_the_token_server(make_daemon, token_registry, image_builder) -> None:
    image = image_builder.busybox("token/identity", "1", registry=token_registry)
    daemon = make_daemon(config_text=image_config(token_registry))
    server = token_registry.token
    assert server is not None
    server.refresh_tokens["refresh-alice"] = AUTH_USER[0]
    response = _pull(daemon, image.reference, api_pb2.AuthConfig(identity_token="refresh-alice"))
    assert response.image_ref == image.config_digest
    grants = [r for r in server.requests if r.get("grant") == "refresh_token"]
    assert grants and grants[-1]["user"] == AUTH_USER[0]
    assert "repository:token/identity:pull" in grants[-1]["scopes"]

    with pytest.raises(grpc.RpcError) as denied:
        _pull(daemon, image.reference, api_pb2.AuthConfig(identity_token="revoked"))
    assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "identity token" in (denied.value.details() or "")


def test_pinned_images_follow_the_configuration(make_daemon, registry, image_builder) -> None:
    kept = image_builder.busybox("pinned/pause", "3.10")
    other = image_builder.multi_arch("unpinned/thing", "1")
    daemon = make_daemon(config_text=image_config(registry) + f'pinned_images = ["{registry.address}/pinned/*"]\n')
    daemon.crictl("pull", kept.reference)
    daemon.crictl("pull", other.reference)
    images = {i["repoTags"][0]: i for i in json.loads(daemon.crictl("images", "-o", "json").stdout)["images"]}
    assert images[kept.reference]["pinned"] is True
    assert not images[other.reference].get("pinned")
