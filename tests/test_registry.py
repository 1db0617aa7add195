"""Image references and the registry client, against real docker-registry instances.

Faults a stock registry cannot produce (403, 429/503 with Retry-After, a body cut mid-stream) come
from FaultProxy, a real HTTP proxy in front of a real registry. Redirected blob GETs use the
registry's own `redirect` storage middleware and a static file server over its storage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest

from pycrio.errors import InvalidArgument, NotFound
from pycrio.images.reference import ImageReference, parse_reference, resolve_candidates
from pycrio.images.registry import (
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_MANIFEST,
    Credentials,
    Descriptor,
    DigestMismatchError,
    ManifestError,
    PermissionDeniedError,
    RegistryClient,
    RegistryUnavailableError,
    UnauthenticatedError,
    credentials_from_cri,
)
from tests.registry_fixture import (
    AUTH_USER,
    BuiltImage,
    ImageBuilder,
    TestRegistry,
)

MakeClient = Callable[..., RegistryClient]
Layer = tuple[RegistryClient, ImageReference, Descriptor]
ALICE = Credentials(*AUTH_USER)
SHA_A = "sha256:" + "a" * 64
SMALL_LAYER = 256 * 1024  # the small multi-layer image: 2 data layers of this size

# -- references --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("someone/app", "docker.io/someone/app:latest"),
        (f"quay.io/a/b@{SHA_A}", f"quay.io/a/b@{SHA_A}"),
        (f"quay.io/a/b:v1@{SHA_A}", f"quay.io/a/b:v1@{SHA_A}"),
        ("localhost:5000/x:1", "localhost:5000/x:1"),
        ("localhost/x", "localhost/x:latest"),
        (
            "registry.example.com:443/team/sub/app:v1.2-rc_3",
            "registry.example.com:443/team/sub/app:v1.2-rc_3",
        ),
        ("ghcr.io/a__b/c-d--e.f:_x", "ghcr.io/a__b/c-d--e.f:_x"),
    ],
)
def test_parse_reference_normalizes(text: str, canonical: str) -> None:
    assert str(parse_reference(text)) == canonical


def test_reference_parts() -> None:
    ref = parse_reference(f"localhost:5000/team/app:1@{SHA_A}")
    assert ref == ImageReference("localhost:5000", "team/app", "1", SHA_A)
    assert ref.name == "localhost:5000/team/app"
    assert parse_reference(f"quay.io/a/b@{SHA_A}").tag is None
    assert parse_reference("quay.io/a/b", default_tag=None).tag is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("quay.io/Team/app", "lowercase"),
        ("foo//bar", "lowercase"),
        ("foo/-bar", "lowercase"),
        ("a b", "lowercase"),
        ("quay.io/", "empty repository"),
        ("x:", "tag ''"),
        ("x:-bad", "tag '-bad'"),
        ("x:" + "t" * 129, "tag"),
        ("x@sha256:abc", "64 lowercase hex"),
        ("x@sha256:" + "A" * 64, "64 lowercase hex"),
        ("x@sha512:" + "a" * 128, "'sha512' is not supported"),
        ("x@md5", "malformed digest"),
        ("x@", "empty digest"),
        (f"@{SHA_A}", "empty repository"),
        ("a" * 64, "image id"),
        ("http://quay.io/x", "bad registry host"),
        ("quay.io/" + "a" * 250, "longer than 255"),
        (" busybox", "whitespace"),
    ],
)
def test_invalid_references_are_rejected(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_reference(text)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(text) in info.value.message
    assert reason in info.value.message


def test_resolve_candidates() -> None:
    assert resolve_candidates("quay.io/a/b:1", ["docker.io"]) == [ImageReference("quay.io", "a/b", "1")]
    assert [str(c) for c in resolve_candidates("busybox", ["quay.io", "docker.io", "docker.io"])] == [
        "quay.io/busybox:latest",
        "docker.io/library/busybox:latest",
    ]
    assert [str(c) for c in resolve_candidates("team/app:2", ["localhost:5000", "docker.io"])] == [
        "localhost:5000/team/app:2",
        "docker.io/team/app:2",
    ]
    assert [str(c) for c in resolve_candidates(f"app@{SHA_A}", ["docker.io"])] == [
        f"docker.io/library/app@{SHA_A}"
    ]
    with pytest.raises(InvalidArgument, match="'busybox' is a short name"):
        resolve_candidates("busybox", [])
    with pytest.raises(InvalidArgument, match="lowercase"):
        resolve_candidates("BusyBox", ["quay.io"])


def test_credentials_from_cri() -> None:
    assert credentials_from_cri("alice", "s3cret", "") == ALICE
    assert credentials_from_cri("", "", "YWxpY2U6czNjcmV0") == ALICE  # base64("alice:s3cret")
    assert credentials_from_cri("", "", "YWxpY2U6czNjcmV0OnRvbw") == Credentials(
        "alice", "s3cret:too"
    )  # no padding
    assert credentials_from_cri("", "", "") is None
    with pytest.raises(InvalidArgument, match="not base64"):
        credentials_from_cri("", "", "!!!")
    with pytest.raises(InvalidArgument, match="no ':'"):
        credentials_from_cri("", "", "YWxpY2U=")
    assert "s3cret" not in repr(ALICE)
    # Tokens win over a password; they never show in repr or in error descriptions.
    by_token = credentials_from_cri("alice", "s3cret", "", registry_token="rt-1", identity_token="it-1")
    assert by_token == Credentials("alice", "", identity_token="it-1", registry_token="rt-1")
    assert by_token.describe() == "registry token"
    identity = credentials_from_cri("", "", "YWxpY2U6czNjcmV0", identity_token="it-1")
    assert identity is not None and identity.describe() == "identity token"
    assert "it-1" not in repr(identity) and "rt-1" not in repr(by_token)


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def make_client() -> Iterator[Callable[..., RegistryClient]]:
    """make_client(*insecure, **kwargs): a RegistryClient with fast retries, closed afterwards."""
    clients: list[RegistryClient] = []

    def make(*insecure: TestRegistry | str, **kwargs: object) -> RegistryClient:
        kwargs.setdefault("retries", 1)
        kwargs.setdefault("backoff", 0.01)
        names = [r if isinstance(r, str) else r.address for r in insecure]
        client = RegistryClient(insecure_registries=names, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def ref(text: str) -> ImageReference:
    return parse_reference(text)


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def layer_names(path: Path) -> list[str]:
    with tarfile.open(path, "r:gz") as tar:
        return tar.getnames()


def read_from_layer(path: Path, name: str) -> str:
    with tarfile.open(path, "r:gz") as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read().decode()


def own_registry(tmp_path: Path, **kwargs: object) -> TestRegistry:
    """A registry only this test uses (so it may stop it or corrupt its storage)."""
    return TestRegistry(tmp_path / "registry", **kwargs).start()  # type: ignore[arg-type]


# -- resolve -----------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_resolve_oci(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient, by: str
) -> None:
    image = image_builder.busybox("test/busybox-oci", "1")
    reference = ref(image.reference if by == "tag" else image.digest_reference)
    resolved = make_client(registry).resolve(reference)
    assert resolved.reference == reference
    assert resolved.repo_digest == resolved.manifest_digest == image.digest
    assert resolved.manifest_media_type == MEDIA_OCI_MANIFEST
    assert "sha256:" + hashlib.sha256(resolved.manifest).hexdigest() == image.digest
    assert resolved.config.digest == image.config_digest
    assert [layer.digest for layer in resolved.layers] == list(image.layers)
    assert [layer.size for layer in resolved.layers] == list(image.layer_sizes)
    assert resolved.layers[0].media_type == "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_resolve_docker_v2s2(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient, by: str
) -> None:
    image = image_builder.busybox("test/busybox-v2s2", "1", fmt="v2s2")
    reference = ref(image.reference if by == "tag" else image.digest_reference)
    resolved = make_client(registry).resolve(reference)
    assert resolved.repo_digest == resolved.manifest_digest == image.digest
    assert resolved.manifest_media_type == MEDIA_DOCKER_MANIFEST
    assert resolved.config.media_type == "application/vnd.docker.container.image.v1+json"
    assert resolved.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert [layer.digest for layer in resolved.layers] == list(image.layers)


def test_config_blob_of_busybox(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    image = image_builder.busybox("test/busybox-oci", "1")
    client = make_client(registry)
    resolved = client.resolve(ref(image.reference))
    config = json.loads(client.fetch_blob_bytes(resolved.reference, resolved.config))
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert len(config["rootfs"]["diff_ids"]) == len(resolved.layers)


def _marker(client: RegistryClient, resolved_ref: ImageReference, layer: Descriptor, tmp_path: Path) -> str:
    dest = tmp_path / f"{layer.digest}.partial"
    client.fetch_blob(resolved_ref, layer, dest)
    return read_from_layer(dest, "etc/arch").strip()


@pytest.mark.parametrize(
    ("platform", "key", "arch"),
    [
        ("linux/amd64", "linux/amd64", "amd64"),
        ("linux/amd64/v3", "linux/amd64", "amd64"),  # amd64 ignores the variant
        ("linux/arm64", "linux/arm64/v8", "arm64"),
        ("linux/arm64/v8", "linux/arm64/v8", "arm64"),
    ],
)
def test_resolve_multi_arch_picks_platform(
    registry: TestRegistry,
    image_builder: ImageBuilder,
    make_client: MakeClient,
    tmp_path: Path,
    platform: str,
    key: str,
    arch: str,
) -> None:
    image = image_builder.multi_arch("test/multiarch", "1")
    client = make_client(registry, platform=platform)
    for text in (image.reference, image.digest_reference):
        resolved = client.resolve(ref(text))
        assert resolved.repo_digest == image.digest  # the index: what `crictl images --digests` shows
        assert resolved.manifest_digest == image.platforms[key]
        assert resolved.manifest_media_type == MEDIA_OCI_MANIFEST
    assert _marker(client, resolved.reference, resolved.layers[-1], tmp_path) == arch


def test_default_platform_is_amd64(registry: TestRegistry, image_builder: ImageBuilder) -> None:
    image = image_builder.multi_arch("test/multiarch", "1")
    with RegistryClient(insecure_registries=[registry.address]) as client:
        assert client.resolve(ref(image.reference)).manifest_digest == image.platforms["linux/amd64"]


def test_missing_platform_lists_available(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    image = image_builder.multi_arch("test/multiarch", "1")
    with pytest.raises(NotFound) as info:
        make_client(registry, platform="linux/s390x").resolve(ref(image.reference))
    message = info.value.message
    assert "linux/s390x" in message and image.reference in message and registry.address in message
    assert "available: linux/amd64, linux/arm64/v8" in message


def test_bad_platform_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="'linux'"):
        RegistryClient(platform="linux")


@pytest.mark.parametrize(
    "missing",
    [
        "{registry}/test/busybox-oci:no-such-tag",
        "{registry}/no/such-repo:1",
        "{registry}/test/busybox-oci@" + SHA_A,
    ],
)
def test_missing_manifest_is_not_found(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient, missing: str
) -> None:
    image_builder.busybox("test/busybox-oci", "1")
    text = missing.format(registry=registry.address)
    with pytest.raises(NotFound) as info:
        make_client(registry).resolve(ref(text))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert text in info.value.message and f"registry {registry.address}" in info.value.message
    assert "MANIFEST_UNKNOWN" in info.value.message


def test_manifest_digest_is_verified(
    tmp_path: Path, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    reg = own_registry(tmp_path)
    try:
        image = image_builder.busybox("corrupt/manifest", "1", registry=reg)
        stored = reg.blob_path(image.digest)
        body = stored.read_bytes()
        stored.write_bytes(body.replace(b'"schemaVersion":2', b'"schemaVersion": 2'))  # still valid JSON
        with pytest.raises(DigestMismatchError) as info:
            make_client(reg).resolve(ref(image.digest_reference))
        assert info.value.code == grpc.StatusCode.DATA_LOSS
        assert image.digest in info.value.message and reg.address in info.value.message
    finally:
        reg.stop()


def test_schema1_is_rejected(tmp_path: Path, image_builder: ImageBuilder, make_client: MakeClient) -> None:
    reg = own_registry(tmp_path, schema1=True)
    try:
        image = image_builder.busybox("old/schema1", "1", fmt="v2s1", registry=reg)
        with pytest.raises(ManifestError) as info:
            make_client(reg).resolve(ref(image.reference))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "schema 1" in info.value.message and image.reference in info.value.message
    finally:
        reg.stop()


def _push_artifact(reg: TestRegistry, name: str, tag: str, config_type: str) -> None:
    """An OCI manifest whose config is not an image config (a Helm chart, a signature...)."""
    config = b'{"kind": "not-an-image"}'
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    with httpx.Client(base_url=reg.url) as http:
        location = http.post(f"/v2/{name}/blobs/uploads/").headers["location"]
        # keep the upload's own query (_state): httpx `params=` would replace it
        separator = "&" if "?" in location else "?"
        http.put(f"{location}{separator}digest={digest}", content=config).raise_for_status()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": digest, "size": len(config)},
            "layers": [],
        }
        headers = {"Content-Type": MEDIA_OCI_MANIFEST}
        http.put(f"/v2/{name}/manifests/{tag}", json=manifest, headers=headers).raise_for_status()


def test_non_image_artifact_is_rejected(registry: TestRegistry, make_client: MakeClient) -> None:
    _push_artifact(registry, "test/artifact", "1", "application/vnd.cncf.helm.config.v1+json")
    with pytest.raises(ManifestError) as info:
        make_client(registry).resolve(ref(f"{registry.address}/test/artifact:1"))
    assert "is not a container image" in info.value.message
    assert "application/vnd.cncf.helm.config.v1+json" in info.value.message
    assert f"{registry.address}/test/artifact:1" in info.value.message


def test_https_unless_insecure(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    client = make_client("localhost:5000")
    assert client.base_url("docker.io") == "https://registry-1.docker.io"
    assert client.base_url("quay.io") == "https://quay.io"
    assert client.base_url("localhost:5000") == "http://localhost:5000"
    assert client.base_url("127.0.0.1:5000") == "https://127.0.0.1:5000"  # only what is listed
    image = image_builder.busybox("test/busybox-oci", "1")
    with pytest.raises(RegistryUnavailableError, match="SSL|TLS|tls|ssl"):
        make_client(retries=0).resolve(ref(image.reference))  # TLS to a plain-HTTP registry


# -- blobs -------------------------------------------------------------------------------------


@pytest.fixture
def busybox_layer(registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient) -> Layer:
    image = image_builder.busybox("test/busybox-oci", "1")
    client = make_client(registry)
    resolved = client.resolve(ref(image.reference))
    return client, resolved.reference, resolved.layers[0]


def test_fetch_blob(busybox_layer: Layer, tmp_path: Path) -> None:
    client, reference, layer = busybox_layer
    dest = tmp_path / "sub" / "blob.partial"
    assert client.fetch_blob(reference, layer, dest) == layer.size
    assert sha256_file(dest) == layer.digest
    assert "bin/busybox" in layer_names(dest) and "bin/sh" in layer_names(dest)
    assert client.fetch_blob(reference, layer, dest) == 0  # already complete: verified, nothing fetched


def test_fetch_blob_resumes(busybox_layer: Layer, tmp_path: Path) -> None:
    client, reference, layer = busybox_layer
    whole = tmp_path / "whole"
    client.fetch_blob(reference, layer, whole)
    half = layer.size // 2
    dest = tmp_path / "blob.partial"
    dest.write_bytes(whole.read_bytes()[:half])
    assert client.fetch_blob(reference, layer, dest) == layer.size - half
    assert sha256_file(dest) == layer.digest


def test_fetch_blob_restarts_after_a_stale_corrupt_prefix(busybox_layer: Layer, tmp_path: Path) -> None:
    client, reference, layer = busybox_layer
    dest = tmp_path / "blob.partial"
    dest.write_bytes(b"\0" * 1000)
    assert client.fetch_blob(reference, layer, dest) == (layer.size - 1000) + layer.size
    assert sha256_file(dest) == layer.digest


def test_fetch_blob_size_mismatch(busybox_layer: Layer, tmp_path: Path) -> None:
    client, reference, layer = busybox_layer
    dest = tmp_path / "blob.partial"
    short = Descriptor(layer.media_type, layer.digest, layer.size - 10)
    with pytest.raises(DigestMismatchError) as info:
        client.fetch_blob(reference, short, dest)
    assert not dest.exists()
    assert layer.digest in info.value.message and str(reference) in info.value.message
    assert reference.registry in info.value.message


def test_fetch_blob_corrupted_on_registry(
    tmp_path: Path, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    reg = own_registry(tmp_path)
    try:
        image = image_builder.busybox("corrupt/blob", "1", registry=reg)
        client = make_client(reg)
        resolved = client.resolve(ref(image.reference))
        for digest in (image.layers[0], image.config_digest):
            stored = reg.blob_path(digest)
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF  # same size, other bytes
            stored.write_bytes(bytes(data))
        dest = tmp_path / "blob.partial"
        with pytest.raises(DigestMismatchError) as info:
            client.fetch_blob(resolved.reference, resolved.layers[0], dest)
        assert info.value.code == grpc.StatusCode.DATA_LOSS
        assert not dest.exists()
        message = info.value.message
        assert image.layers[0] in message and image.reference in message and reg.address in message
        with pytest.raises(DigestMismatchError, match=image.config_digest):
            client.fetch_blob_bytes(resolved.reference, resolved.config)
    finally:
        reg.stop()


def test_missing_blob_is_not_found(busybox_layer: Layer, tmp_path: Path) -> None:
    client, reference, layer = busybox_layer
    with pytest.raises(NotFound) as info:
        client.fetch_blob(reference, Descriptor(layer.media_type, SHA_A, 10), tmp_path / "x")
    assert SHA_A in info.value.message and str(reference) in info.value.message
    assert "BLOB_UNKNOWN" in info.value.message


def test_multi_layer_image_has_whiteout_and_opaque_layers(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient, tmp_path: Path
) -> None:
    image = image_builder.multi_layer("test/layers", "small", layers=2, layer_size=SMALL_LAYER)
    client = make_client(registry)
    resolved = client.resolve(ref(image.reference))
    assert len(resolved.layers) == 1 + 2 + 2
    names = []
    for i, layer in enumerate(resolved.layers):
        dest = tmp_path / f"layer-{i}"
        client.fetch_blob(resolved.reference, layer, dest)
        names.append(layer_names(dest))
    assert "data/layer-0.bin" in names[1] and "data/doomed.txt" in names[1] and "replaced/a.txt" in names[1]
    assert "data/layer-1.bin" in names[2]
    assert "data/.wh.doomed.txt" in names[3]
    assert names[4] == ["replaced", "replaced/.wh..wh..opq", "replaced/c.txt"]


def test_parallel_layer_downloads_benchmark_image(
    registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient, tmp_path: Path
) -> None:
    """The benchmark image (5 x 10 MiB random layers), every layer at once through one client."""
    image = image_builder.multi_layer("bench/layers", "5x10m", layers=5, layer_size=10 * 1024 * 1024)
    client = make_client(registry)
    resolved = client.resolve(ref(image.reference))
    with ThreadPoolExecutor(max_workers=4) as pool:
        fetched = list(
            pool.map(lambda d: client.fetch_blob(resolved.reference, d, tmp_path / d.digest), resolved.layers)
        )
    assert fetched == [layer.size for layer in resolved.layers]
    assert sum(fetched) > 50 * 1024 * 1024
    for layer in resolved.layers:
        assert sha256_file(tmp_path / layer.digest) == layer.digest


# -- availability and retries ----------------------------------------------------------------


def test_registry_down_then_back(
    tmp_path: Path, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    reg = own_registry(tmp_path)
    try:
        image = image_builder.busybox("updown/busybox", "1", registry=reg)
        client = make_client(reg, retries=2, backoff=0.05)
        client.resolve(ref(image.reference))
        reg.stop()
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError) as info:
            client.resolve(ref(image.reference))
        assert time.monotonic() - started >= 0.05 + 0.1  # two backoffs
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        message = info.value.message
        assert image.reference in message and f"registry {reg.address}" in message
        assert "after 2 retries" in message and "ConnectError" in message
        reg.start()
        assert client.resolve(ref(image.reference)).manifest_digest == image.digest
    finally:
        reg.stop()


def test_retries_ride_out_a_restart(
    tmp_path: Path, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    reg = own_registry(tmp_path)
    try:
        image = image_builder.busybox("updown/busybox", "1", registry=reg)
        reg.stop()
        timer = threading.Timer(0.3, reg.start)
        timer.start()
        client = make_client(reg, retries=6, backoff=0.1)
        assert client.resolve(ref(image.reference)).manifest_digest == image.digest
        timer.join()
    finally:
        reg.stop()


class FaultProxy:
    """A real HTTP proxy to a registry that first plays injected faults on matching paths.

    inject("manifests/", 503, 503) answers the next two manifest GETs with 503, then forwards;
    "cut" forwards but closes the connection halfway through the body.
    """

    def __init__(self, upstream: TestRegistry) -> None:
        self.upstream = upstream.url
        self.retry_after: str | None = None
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._plan: list[tuple[str, int | str]] = []
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=10)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def inject(self, path_part: str, *actions: int | str) -> None:
        with self._lock:
            self._plan += [(path_part, action) for action in actions]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def _next_action(self, path: str) -> int | str | None:
        with self._lock:
            for i, (part, action) in enumerate(self._plan):
                if part in path:
                    del self._plan[i]
                    return action
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                with proxy._lock:
                    proxy.requests.append((self.path, dict(self.headers)))
                action = proxy._next_action(self.path)
                if isinstance(action, int):
                    return self._fail(action)
                forwarded = {
                    k: v for k, v in self.headers.items() if k.lower() in ("accept", "range", "authorization")
                }
                upstream = proxy._http.get(proxy.upstream + self.path, headers=forwarded)
                body = upstream.content
                self.send_response(upstream.status_code)
                for name, value in upstream.headers.items():
                    if name.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "content-encoding",
                    ):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if action == "cut" else body)
                self.close_connection = action == "cut"

            def _fail(self, status: int) -> None:
                body = json.dumps(
                    {"errors": [{"code": "INJECTED", "message": f"injected {status}"}]}
                ).encode()
                self.send_response(status)
                if proxy.retry_after is not None:
                    self.send_header("Retry-After", proxy.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def proxy(registry: TestRegistry) -> Iterator[FaultProxy]:
    p = FaultProxy(registry)
    yield p
    p.close()


def _via(proxy: FaultProxy, image: BuiltImage) -> ImageReference:
    return ref(image.reference.replace(image.reference.split("/")[0], proxy.address))


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(
    proxy: FaultProxy, image_builder: ImageBuilder, make_client: MakeClient, status: int
) -> None:
    image = image_builder.busybox("test/busybox-oci", "1")
    proxy.inject("manifests/", status, status)
    assert make_client(proxy.address, retries=2).resolve(_via(proxy, image)).manifest_digest == image.digest
    proxy.inject("manifests/", status, status, status)
    with pytest.raises(RegistryUnavailableError) as info:
        make_client(proxy.address, retries=2).resolve(_via(proxy, image))
    assert f"HTTP {status}: injected {status} (INJECTED)" in info.value.message
    assert proxy.address in info.value.message


def test_small_retry_after_is_honoured(
    proxy: FaultProxy, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    image = image_builder.busybox("test/busybox-oci", "1")
    proxy.retry_after = "0"
    proxy.inject("manifests/", 429, 503)
    started = time.monotonic()
    make_client(proxy.address, retries=2, backoff=5.0).resolve(_via(proxy, image))
    assert time.monotonic() - started < 2.0  # Retry-After: 0 instead of 5 s + 10 s of backoff
    proxy.retry_after = "3600"  # too long: our own (short) backoff instead
    proxy.inject("manifests/", 429)
    started = time.monotonic()
    make_client(proxy.address, retries=1, backoff=0.01).resolve(_via(proxy, image))
    assert time.monotonic() - started < 2.0


def test_forbidden_is_permission_denied(
    proxy: FaultProxy, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    image = image_builder.busybox("test/busybox-oci", "1")
    proxy.inject("manifests/", 403)
    with pytest.raises(PermissionDeniedError) as info:
        make_client(proxy.address).resolve(_via(proxy, image))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert proxy.address in info.value.message and "test/busybox-oci:1" in info.value.message


def test_interrupted_download_resumes(
    proxy: FaultProxy, image_builder: ImageBuilder, make_client: MakeClient, tmp_path: Path
) -> None:
    image = image_builder.busybox("test/busybox-oci", "1")
    client = make_client(proxy.address, retries=2)
    resolved = client.resolve(_via(proxy, image))
    layer = resolved.layers[0]
    proxy.inject("blobs/", "cut")
    dest = tmp_path / "blob.partial"
    assert client.fetch_blob(resolved.reference, layer, dest) == layer.size  # half, then the rest
    assert sha256_file(dest) == layer.digest
    blob_requests = [headers for path, headers in proxy.requests if "blobs/" in path]
    assert "Range" not in blob_requests[0] and blob_requests[1]["Range"] == f"bytes={layer.size // 2}-"
    assert blob_requests[0]["Accept-Encoding"] == "identity"


# -- authentication --------------------------------------------------------------------------


@pytest.fixture(params=["basic", "bearer"])
def private(request: pytest.FixtureRequest, image_builder: ImageBuilder) -> tuple[TestRegistry, BuiltImage]:
    """(registry, image) on the htpasswd registry or the token registry."""
    reg: TestRegistry = request.getfixturevalue(
        "auth_registry" if request.param == "basic" else "token_registry"
    )
    return reg, image_builder.busybox("private/busybox", "1", registry=reg)


def test_auth_without_credentials(private: tuple[TestRegistry, BuiltImage], make_client: MakeClient) -> None:
    reg, image = private
    with pytest.raises(UnauthenticatedError) as info:
        make_client(reg).resolve(ref(image.reference))
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert (
        f"credentials are required to pull image {image.reference} from registry {reg.address}"
        in info.value.message
    )


def test_auth_wrong_credentials(private: tuple[TestRegistry, BuiltImage], make_client: MakeClient) -> None:
    reg, image = private
    with pytest.raises(UnauthenticatedError) as info:
        make_client(reg).resolve(ref(image.reference), Credentials("alice", "wrong"))
    assert f"credentials rejected by registry {reg.address} for image {image.reference}" in info.value.message
    assert "wrong" not in info.value.message


@pytest.mark.parametrize(
    "cri_auth",
    [("alice", "s3cret", ""), ("", "", "YWxpY2U6czNjcmV0")],
    ids=["username-password", "auth-base64"],
)
def test_auth_right_credentials(
    private: tuple[TestRegistry, BuiltImage],
    make_client: MakeClient,
    tmp_path: Path,
    cri_auth: tuple[str, str, str],
) -> None:
    reg, image = private
    credentials = credentials_from_cri(*cri_auth)
    client = make_client(reg)
    resolved = client.resolve(ref(image.reference), credentials)
    assert resolved.manifest_digest == image.digest
    assert (
        client.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "l", credentials)
        == resolved.layers[0].size
    )
    assert client.fetch_blob_bytes(resolved.reference, resolved.config, credentials)


def test_bearer_token_is_cached(
    token_registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient, tmp_path: Path
) -> None:
    server = token_registry.token
    assert server is not None
    image = image_builder.multi_layer(
        "private/layers", "small", layers=2, layer_size=SMALL_LAYER, registry=token_registry
    )
    client = make_client(token_registry)
    before = len(server.requests)
    resolved = client.resolve(ref(image.reference), ALICE)
    client.fetch_blob_bytes(resolved.reference, resolved.config, ALICE)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(
            pool.map(
                lambda d: client.fetch_blob(resolved.reference, d, tmp_path / d.digest, ALICE),
                resolved.layers,
            )
        )
    asked = server.requests[before:]
    assert len(asked) == 1  # one token for the manifest, config and all layers
    assert asked[0] == {"user": "alice", "scopes": ["repository:private/layers:pull"]}
    # a token obtained with credentials never serves an anonymous pull of the same repository
    with pytest.raises(UnauthenticatedError):
        client.resolve(ref(image.reference))


def test_bearer_access_token_field_and_anonymous_tokens(
    token_registry: TestRegistry, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    server = token_registry.token
    assert server is not None
    image = image_builder.busybox("private/busybox", "1", registry=token_registry)
    server.token_field = "access_token"
    server.allow_anonymous = True  # Docker Hub style: anonymous gets a token with no access
    try:
        assert (
            make_client(token_registry).resolve(ref(image.reference), ALICE).manifest_digest == image.digest
        )
        with pytest.raises(UnauthenticatedError, match="credentials are required"):
            make_client(token_registry).resolve(ref(image.reference))
    finally:
        server.token_field = "token"
        server.allow_anonymous = False


class _RecordingFiles(SimpleHTTPRequestHandler):
    """Serves the registry's storage directory (no Range support) and records request headers."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(dict(self.headers))
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_redirected_blobs_without_authorization(
    tmp_path: Path, image_builder: ImageBuilder, make_client: MakeClient
) -> None:
    """Blob GETs redirect to another origin: followed, without our Authorization, and a 200 to a
    Range request (this file server ignores Range) restarts the download from byte 0."""
    storage = tmp_path / "registry" / "storage"
    storage.mkdir(parents=True)
    handler = functools.partial(type("Files", (_RecordingFiles,), {"seen": []}), directory=str(storage))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, args=(0.05,), daemon=True).start()
    reg = own_registry(
        tmp_path, htpasswd=AUTH_USER, redirect_to=f"http://localhost:{files.server_address[1]}/"
    )
    try:
        image = image_builder.busybox("redirect/busybox", "1", registry=reg)
        client = make_client(reg)
        resolved = client.resolve(ref(image.reference), ALICE)
        layer = resolved.layers[0]
        dest = tmp_path / "blob.partial"
        dest.write_bytes(b"x" * 100)  # a prefix to resume from: the file server answers 200
        assert client.fetch_blob(resolved.reference, layer, dest, ALICE) == layer.size
        assert sha256_file(dest) == layer.digest
        seen = handler.func.seen  # type: ignore[attr-defined]
        assert seen and all("Authorization" not in headers for headers in seen)
        assert seen[0]["Range"] == "bytes=100-"
    finally:
        reg.stop()
        files.shutdown()
        files.server_close()
