"""Real registries and real images for tests: docker-registry, a JWT token server, umoci + skopeo.

- TestRegistry runs `/usr/bin/docker-registry serve` on 127.0.0.1 with its own config and storage,
  plain, with htpasswd (Basic) auth, or with token (Bearer) auth from a TokenServer.
- TokenServer issues RS256 JWTs the registry trusts (key and self-signed cert made by `openssl`).
- ImageBuilder builds OCI layouts with umoci (cached for the session) and pushes them with skopeo.

Fixtures for conftest: `registry`, `auth_registry`, `token_registry`, `image_builder`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
HTPASSWD_BIN = "/usr/bin/htpasswd"
BUSYBOX_BIN = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "ls", "echo", "cat", "sleep")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str) -> str:
    """Run a command; its stdout, or an error carrying its stderr."""
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


# -- token server ----------------------------------------------------------------------------


class TokenServer:
    """A docker-style token endpoint: GET /token?service=&scope= with Basic auth -> signed JWT.

    Known users get the actions they ask for; anonymous requests get 401 unless
    `allow_anonymous` (then a token with no access at all, as Docker Hub does for private repos).
    """

    __test__ = False
    service = "pycrio-test-registry"
    issuer = "pycrio-test-issuer"

    def __init__(self, directory: Path, users: dict[str, str], token_field: str = "token") -> None:
        self.directory = directory
        self.users = users
        self.token_field = token_field
        self.allow_anonymous = False
        self.requests: list[dict[str, object]] = []  # what was asked: user, scopes (and grant)
        self.refresh_tokens: dict[str, str] = {}  # OAuth2 refresh (identity) token -> user
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self.key = directory / "token.key"
        self.cert = directory / "token.crt"
        run(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(self.key),
            "-out",
            str(self.cert),
            "-days",
            "2",
            "-subj",
            "/CN=pycrio-test-token-issuer",
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], capture_output=True, check=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def issue(self, user: str, scopes: list[str]) -> str:
        """A JWT for `user` granting the requested `repository:name:actions` scopes."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",") if user else []})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _authorize(self, header: str | None) -> str | None:
        """The user a Basic Authorization header proves, '' for anonymous, None if rejected."""
        if not header:
            return "" if self.allow_anonymous else None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(value).decode().partition(":")
        return user if self.users.get(user) == password else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                url = urlparse(self.path)
                query = parse_qs(url.query)
                user = server._authorize(self.headers.get("Authorization"))
                with server._lock:
                    server.requests.append({"user": user, "scopes": query.get("scope", [])})
                if url.path != "/token" or user is None:
                    self.send_response(401 if url.path == "/token" else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                token = server.issue(user, query.get("scope", []))
                body = json.dumps({server.token_field: token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - OAuth2 refresh-token grant (docker identity tokens)
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                grant = form.get("grant_type", [""])[0]
                user = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                with server._lock:
                    server.requests.append({"user": user, "scopes": form.get("scope", []), "grant": grant})
                if urlparse(self.path).path != "/token" or grant != "refresh_token" or user is None:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                token = server.issue(user, form.get("scope", []))
                body = json.dumps({"access_token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- registry --------------------------------------------------------------------------------


class TestRegistry:
    """docker-registry on 127.0.0.1:<port> with filesystem storage; stop() and start() again."""

    __test__ = False

    def __init__(
        self,
        directory: Path,
        htpasswd: tuple[str, str] | None = None,
        token: TokenServer | None = None,
        port: int | None = None,
        redirect_to: str | None = None,
        schema1: bool = False,
    ) -> None:
        """`redirect_to` (a base URL): blob GETs answer 307 to <base>/<storage path> (the
        registry's `redirect` storage middleware), as registries backed by S3 or a CDN do."""
        self.directory = directory
        self.htpasswd = htpasswd
        self.token = token
        self.redirect_to = redirect_to
        self.schema1 = schema1  # accept pushes of (deprecated) schema 1 manifests
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "config.yml"
        self.log = directory / "registry.log"
        self.config.write_text(self._config_text())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def storage(self) -> Path:
        """The filesystem driver's root (blobs live under docker/registry/v2/blobs/sha256/)."""
        return self.directory / "storage"

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (tests corrupt them to check verification)."""
        hexdigest = digest.removeprefix("sha256:")
        return (
            self.storage
            / "docker"
            / "registry"
            / "v2"
            / "blobs"
            / "sha256"
            / hexdigest[:2]
            / hexdigest
            / "data"
        )

    @property
    def credentials(self) -> tuple[str, str] | None:
        """user/password that may push, if the registry needs them."""
        if self.htpasswd:
            return self.htpasswd
        if self.token:
            return next(iter(self.token.users.items()))
        return None

    def _config_text(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.address}",
            "  secret: pycrio-test-secret",
        ]
        if self.schema1:
            lines += ["compatibility:", "  schema1:", "    enabled: true"]
        if self.redirect_to:
            lines += [
                "middleware:",
                "  storage:",
                "    - name: redirect",
                "      options:",
                f"        baseurl: {self.redirect_to}",
            ]
        if self.htpasswd:
            user, password = self.htpasswd
            htfile = self.directory / "htpasswd"
            htfile.write_text(run(HTPASSWD_BIN, "-Bbn", user, password))
            lines += ["auth:", "  htpasswd:", "    realm: pycrio-test", f"    path: {htfile}"]
        elif self.token:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {self.token.realm}",
                f"    service: {self.token.service}",
                f"    issuer: {self.token.issuer}",
                f"    rootcertbundle: {self.token.cert}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> TestRegistry:
        """Start serving; return once GET /v2/ answers 200 or 401."""
        log = self.log.open("ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: {self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/v2/", timeout=1.0).status_code in (200, 401):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry not answering on {self.address}: {self._log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def __enter__(self) -> TestRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    """An image pushed to a test registry."""

    reference: str  # 127.0.0.1:PORT/name:tag
    digest: str  # what the tag points to: manifest digest, or index digest for multi_arch
    config_digest: str
    layers: tuple[str, ...]  # layer digests, base first (multi_arch: the amd64 image)
    layer_sizes: tuple[int, ...]
    platforms: dict[str, str] = field(default_factory=dict)  # multi_arch: platform -> manifest digest

    @property
    def name(self) -> str:
        return self.reference.rpartition(":")[0]

    @property
    def digest_reference(self) -> str:
        return f"{self.name}@{self.digest}"


@dataclass(frozen=True)
class _Layout:
    """A built image in the session's OCI layout: its tag there and what it is made of."""

    tag: str
    config_digest: str
    layers: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    platforms: dict[str, str] = field(default_factory=dict)


class ImageBuilder:
    """Builds images with umoci into one cached OCI layout and pushes them with skopeo."""

    __test__ = False

    def __init__(self, directory: Path, registry: TestRegistry) -> None:
        self.directory = directory
        self.registry = registry
        self.layout = directory / "layout"
        self._built: dict[str, _Layout] = {}
        self._lock = threading.RLock()  # builds nest: multi_layer builds busybox first
        self.timings: dict[str, float] = {}  # "build <tag>" / "push <ref>" -> seconds
        directory.mkdir(parents=True, exist_ok=True)
        if not (self.layout / "index.json").exists():
            run("umoci", "init", "--layout", str(self.layout))
            run("umoci", "new", "--image", f"{self.layout}:empty")

    # -- public: build (cached) and push -----------------------------------------------------

    def busybox(
        self, name: str, tag: str, fmt: str = "oci", registry: TestRegistry | None = None
    ) -> BuiltImage:
        """A one-layer image: /bin/busybox plus sh/ls/echo/cat/sleep symlinks, Cmd ["/bin/sh"].

        `fmt`: "oci", "v2s2" (Docker media types) or "v2s1" (schema 1, to test its rejection;
        the record's config/layers then describe the OCI source, not what was pushed).
        """
        return self._push(self._cached("busybox", self._build_busybox), name, tag, fmt, registry)

    def multi_layer(
        self,
        name: str,
        tag: str,
        layers: int = 5,
        layer_size: int = 10 * 1024 * 1024,
        registry: TestRegistry | None = None,
    ) -> BuiltImage:
        """busybox + `layers` layers of `layer_size` random bytes + a whiteout layer + an opaque-dir layer.

        Layer order: [busybox, data-0 .. data-N-1, whiteout (deletes /data/doomed.txt from data-0),
        opaque (/replaced/ emptied by `.wh..wh..opq`, then replaced/c.txt)].
        """
        key = f"multi-{layers}x{layer_size}"
        built = self._cached(key, lambda: self._build_multi_layer(key, layers, layer_size))
        return self._push(built, name, tag, "oci", registry)

    def multi_arch(self, name: str, tag: str, registry: TestRegistry | None = None) -> BuiltImage:
        """An OCI index: linux/amd64 and linux/arm64/v8, each with /etc/arch naming its arch."""
        return self._push(self._cached("multiarch", self._build_multi_arch), name, tag, "oci", registry)

    def _cached(self, key: str, build: Callable[[], _Layout]) -> _Layout:
        with self._lock:
            if key not in self._built:
                started = time.monotonic()
                self._built[key] = build()
                self.timings[f"build {key}"] = time.monotonic() - started
            return self._built[key]

    def _push(
        self, built: _Layout, name: str, tag: str, fmt: str, registry: TestRegistry | None
    ) -> BuiltImage:
        registry = registry or self.registry
        reference = f"{registry.address}/{name}:{tag}"
        digestfile = self.directory / f"digest-{uuid.uuid4().hex}"
        cmd = [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--digestfile",
            str(digestfile),
        ]
        if built.platforms:
            cmd.append("--all")
        if fmt in ("v2s2", "v2s1"):  # v2s1 needs a TestRegistry(schema1=True)
            cmd += ["--format", fmt]
        elif fmt != "oci":
            raise ValueError(f"fmt must be 'oci', 'v2s2' or 'v2s1', not {fmt!r}")
        if registry.credentials:
            cmd += ["--dest-creds", ":".join(registry.credentials)]
        started = time.monotonic()
        run(*cmd, f"oci:{self.layout}:{built.tag}", f"docker://{reference}")
        self.timings[f"push {reference}"] = time.monotonic() - started
        digest = digestfile.read_text().strip()
        digestfile.unlink()
        return BuiltImage(
            reference, digest, built.config_digest, built.layers, built.layer_sizes, dict(built.platforms)
        )

    # -- builds ------------------------------------------------------------------------------

    def _build_busybox(self) -> _Layout:
        bundle = self._unpack("empty", "busybox")
        bin_dir = bundle / "rootfs" / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        (bundle / "rootfs" / "etc").mkdir(exist_ok=True)
        shutil.copy2(BUSYBOX_BIN, bin_dir / "busybox")
        for applet in BUSYBOX_APPLETS:
            (bin_dir / applet).symlink_to("busybox")
        self._umoci("repack", "--image", self._image("busybox"), str(bundle))
        self._umoci(
            "config",
            "--image",
            self._image("busybox"),
            "--os",
            "linux",
            "--architecture",
            "amd64",
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        )
        shutil.rmtree(bundle)
        return self._describe("busybox")

    def _build_multi_layer(self, tag: str, layers: int, layer_size: int) -> _Layout:
        base = self._cached("busybox", self._build_busybox)
        bundle = self._unpack(base.tag, tag)
        rootfs = bundle / "rootfs"
        (rootfs / "data").mkdir()
        for i in range(layers):
            (rootfs / "data" / f"layer-{i}.bin").write_bytes(os.urandom(layer_size))
            if i == 0:
                (rootfs / "data" / "doomed.txt").write_text("deleted by a later layer\n")
                (rootfs / "replaced").mkdir()
                for old in ("a.txt", "b.txt"):
                    (rootfs / "replaced" / old).write_text(f"{old} before the opaque layer\n")
            self._repack(tag, bundle)
        (rootfs / "data" / "doomed.txt").unlink()
        self._repack(tag, bundle)  # umoci writes data/.wh.doomed.txt
        # umoci repack never writes opaque markers (it whites out each removed file), so the
        # opaque layer is a hand-made tar appended verbatim.
        opaque = self.directory / f"{tag}-opaque.tar"
        opaque.write_bytes(
            _tar(
                [
                    ("replaced/", None),
                    ("replaced/.wh..wh..opq", b""),
                    ("replaced/c.txt", b"c.txt replaced the directory\n"),
                ]
            )
        )
        self._umoci("raw", "add-layer", "--image", self._image(tag), str(opaque))
        opaque.unlink()
        shutil.rmtree(bundle)
        return self._describe(tag)

    def _build_multi_arch(self) -> _Layout:
        base = self._cached("busybox", self._build_busybox)
        platforms: dict[str, str] = {}
        entries = []
        for arch, variant in (("amd64", None), ("arm64", "v8")):
            tag = f"arch-{arch}"
            bundle = self._unpack(base.tag, tag)
            (bundle / "rootfs" / "etc" / "arch").write_text(f"{arch}\n")
            self._umoci("repack", "--image", self._image(tag), str(bundle))
            self._umoci("config", "--image", self._image(tag), "--architecture", arch)
            shutil.rmtree(bundle)
            entry = dict(self._index_entry(tag))
            entry.pop("annotations", None)
            entry["platform"] = {
                "architecture": arch,
                "os": "linux",
                **({"variant": variant} if variant else {}),
            }
            entries.append(entry)
            platforms["/".join(filter(None, ("linux", arch, variant)))] = entry["digest"]
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        index_digest = self._write_blob(index)
        self._set_tag("multiarch", {"mediaType": OCI_INDEX, "digest": index_digest, "size": len(index)})
        amd64 = self._describe("arch-amd64")
        return _Layout("multiarch", amd64.config_digest, amd64.layers, amd64.layer_sizes, platforms)

    # -- umoci and layout helpers ------------------------------------------------------------

    def _image(self, tag: str) -> str:
        return f"{self.layout}:{tag}"

    def _umoci(self, *args: str) -> str:
        return run("umoci", *args)

    def _unpack(self, source_tag: str, new_tag: str) -> Path:
        bundle = self.directory / f"bundle-{new_tag}"
        shutil.rmtree(bundle, ignore_errors=True)
        rootless = [] if os.geteuid() == 0 else ["--rootless"]
        self._umoci("unpack", *rootless, "--image", self._image(source_tag), str(bundle))
        return bundle

    def _repack(self, tag: str, bundle: Path) -> None:
        # --refresh-bundle: the next repack diffs against this layer, not the original unpack
        self._umoci("repack", "--refresh-bundle", "--image", self._image(tag), str(bundle))

    def _index(self) -> dict[str, Any]:
        index: dict[str, Any] = json.loads((self.layout / "index.json").read_text())
        return index

    def _index_entry(self, tag: str) -> dict[str, Any]:
        entry: dict[str, Any]
        for entry in self._index()["manifests"]:
            if entry.get("annotations", {}).get(REF_NAME) == tag:
                return entry
        raise KeyError(f"tag {tag} not in {self.layout}")

    def _set_tag(self, tag: str, descriptor: dict[str, Any]) -> None:
        index = self._index()
        manifests = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
        manifests.append({**descriptor, "annotations": {REF_NAME: tag}})
        index["manifests"] = manifests
        (self.layout / "index.json").write_text(json.dumps(index))

    def _blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    def _write_blob(self, data: bytes) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        (self.layout / "blobs" / "sha256" / hexdigest).write_bytes(data)
        return f"sha256:{hexdigest}"

    def _describe(self, tag: str) -> _Layout:
        manifest = json.loads(self._blob(str(self._index_entry(tag)["digest"])))
        layers = manifest["layers"]
        return _Layout(
            tag,
            manifest["config"]["digest"],
            tuple(layer["digest"] for layer in layers),
            tuple(layer["size"] for layer in layers),
        )


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    """An uncompressed tar: (name, None) is a directory, (name, data) a regular file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = int(time.time())
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- fixtures --------------------------------------------------------------------------------

AUTH_USER = ("alice", "s3cret")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """A plain (no auth) docker-registry for the whole session."""
    with TestRegistry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """A docker-registry with htpasswd (Basic) auth: alice / s3cret."""
    with TestRegistry(tmp_path_factory.mktemp("auth-registry"), htpasswd=AUTH_USER) as reg:
        yield reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """A docker-registry with token (Bearer) auth from a TokenServer: alice / s3cret."""
    directory = tmp_path_factory.mktemp("token-registry")
    server = TokenServer(directory / "token", dict([AUTH_USER])).start()
    try:
        with TestRegistry(directory, token=server) as reg:
            yield reg
    finally:
        server.stop()


@pytest.fixture(scope="session")
def image_builder(tmp_path_factory: pytest.TempPathFactory, registry: TestRegistry) -> ImageBuilder:
    """Builds and pushes test images (to `registry` unless told otherwise)."""
    return ImageBuilder(tmp_path_factory.mktemp("images"), registry)
