"""OCI distribution v2 client: resolve manifests (picking the platform of an index) and fetch blobs.

Requests go anonymous first and answer 401 challenges (Basic, or Bearer tokens from the realm,
cached per registry, scope and credentials). Connection failures, timeouts, 5xx and 429 are
retried with exponential backoff; blob downloads resume with `Range` after an interruption.
Every error names the image reference and the registry.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import grpc
import httpx

from pycrio.errors import (
    CRIError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from pycrio.images.reference import DOCKER_HUB, ImageReference

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
CONFIG_TYPES = (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG)
# Sent on every manifest GET: without it the registry may convert Docker manifests to schema 1
# or refuse OCI manifests outright.
ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST))

DOCKER_HUB_API_HOST = "registry-1.docker.io"
# client_id sent with OAuth2 token requests (the distribution spec asks for one).
OAUTH_CLIENT_ID = "pycrio"
MANIFEST_MAX_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
RETRY_AFTER_MAX = 10.0  # a longer Retry-After is ignored in favour of our own backoff
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
NOT_FOUND_CODES = frozenset({"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"})
_SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


class DigestMismatchError(DataLoss):
    """Downloaded bytes do not match the digest or size they were announced with."""


class UnauthenticatedError(Unauthenticated):
    """The registry wants credentials we do not have, or rejected the ones we sent."""


class PermissionDeniedError(PermissionDenied):
    """The registry knows who we are and refuses access (HTTP 403)."""


class RegistryUnavailableError(Unavailable):
    """The registry could not be reached or kept failing after all retries."""


class ManifestError(FailedPrecondition):
    """A manifest we cannot use: schema 1, unknown media type, malformed, not a container image."""


class RegistryError(CRIError):
    """Any other unexpected answer from the registry."""

    code = grpc.StatusCode.UNKNOWN


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = field(default=None, hash=False)
    annotations: dict[str, str] | None = field(default=None, hash=False)


@dataclass
class ResolvedImage:
    """What a reference resolves to on its registry, for one platform."""

    reference: ImageReference
    repo_digest: str  # what the tag points to: the index digest for an index, else manifest digest
    manifest_digest: str
    manifest: bytes
    manifest_media_type: str
    config: Descriptor
    layers: list[Descriptor]


@dataclass(frozen=True)
class Credentials:
    """What proves who we are to a registry: username and password; or an identity token (an
    OAuth2 refresh token traded at the token server); or a registry token (a bearer token sent
    as it is)."""

    username: str
    password: str = field(repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    server_address: str = ""  # AuthConfig.server_address: the registry they are for ("" unsaid)

    def for_host(self, host: str) -> bool:
        """Whether `server_address` names `host` (`host[:port]`; a scheme and path are allowed)."""
        if not self.server_address:
            return False
        named = self.server_address.partition("://")[2] or self.server_address
        named = named.partition("/")[0].lower()
        hub = {DOCKER_HUB, "index.docker.io", DOCKER_HUB_API_HOST}
        return named == host.lower() or (named in hub and host.lower() in hub)

    def describe(self) -> str:
        """How these credentials identify the caller, for error messages (no secrets)."""
        if self.registry_token:
            return "registry token"
        if self.identity_token:
            return f"identity token{f' of user {self.username!r}' if self.username else ''}"
        return f"user {self.username!r}"


def credentials_from_cri(
    username: str,
    password: str,
    auth: str,
    identity_token: str = "",
    registry_token: str = "",
    server_address: str = "",
) -> Credentials | None:
    """Credentials from a CRI AuthConfig: a registry token, an identity token, explicit
    username/password, else `auth` (base64 user:pass), in that order."""
    if registry_token or identity_token:
        return Credentials(
            username, "", identity_token=identity_token, registry_token=registry_token, server_address=server_address
        )
    if username or password:
        return Credentials(username, password, server_address=server_address)
    if not auth:
        return None
    try:
        decoded = base64.b64decode(auth + "=" * (-len(auth) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"AuthConfig.auth is not base64 of 'user:password': {exc}") from None
    user, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidArgument("AuthConfig.auth decodes to no 'user:password' pair (no ':')")
    return Credentials(user, secret, server_address=server_address)


class _TransientError(Exception):
    """A failure worth retrying (5xx, 429, a broken stream); `retry_after` from the server if any."""

    def __init__(self, cause: str, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


@dataclass
class _Token:
    header: str  # the full Authorization header value
    expires: float  # time.monotonic() deadline; inf for Basic


class RegistryClient:
    """A thread-safe distribution v2 client shared by all pulls."""

    def __init__(
        self,
        insecure_registries: Iterable[str] = (),
        platform: str = "linux/amd64",
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.insecure_registries = frozenset(insecure_registries)
        self.platform = platform
        self._platform = _parse_platform(platform)
        self.retries = retries
        self.backoff = backoff
        # Redirects (blob GETs sent to storage) are followed; httpx drops Authorization when the
        # redirect leaves the registry's origin.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True)
        self._tokens: dict[tuple[str, str, Credentials | None], _Token] = {}
        self._tokens_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- manifests ---------------------------------------------------------------------------

    def resolve(
        self,
        ref: ImageReference,
        credentials: Credentials | None = None,
        insecure: bool = False,
        retries: int | None = None,
    ) -> ResolvedImage:
        """Fetch the manifest `ref` names; for an index, the manifest of our platform.

        `insecure`: plain HTTP even if the registry is not in `insecure_registries`; `retries`:
        instead of the client's (a mirror is given fewer: the next source is waiting)."""
        target = ref.digest or ref.tag
        if not target:
            raise InvalidArgument(f"image {ref}: a tag or a digest is needed to pull")
        body, media_type = self._get_manifest(ref, target, credentials, insecure, retries)
        repo_digest = _sha256(body)
        if ref.digest and repo_digest != ref.digest:
            raise DigestMismatchError(
                f"image {ref} on registry {ref.registry}: manifest has digest {repo_digest}, "
                f"not the {ref.digest} requested"
            )
        manifest_digest = repo_digest
        if media_type in INDEX_TYPES:
            entry = self._pick_platform(ref, body)
            body, media_type = self._get_manifest(ref, entry.digest, credentials, insecure, retries)
            manifest_digest = _sha256(body)
            if manifest_digest != entry.digest or len(body) != entry.size:
                raise DigestMismatchError(
                    f"image {ref} on registry {ref.registry}: manifest for {self.platform} has "
                    f"digest {manifest_digest} ({len(body)} bytes), the index says {entry.digest} "
                    f"({entry.size} bytes)"
                )
            if media_type not in MANIFEST_TYPES:
                raise ManifestError(
                    f"image {ref} on registry {ref.registry}: index entry for {self.platform} is "
                    f"a {media_type}, not an image manifest"
                )
        config, layers = _parse_manifest(ref, body)
        return ResolvedImage(ref, repo_digest, manifest_digest, body, media_type, config, layers)

    def _get_manifest(
        self,
        ref: ImageReference,
        target: str,
        credentials: Credentials | None,
        insecure: bool = False,
        retries: int | None = None,
    ) -> tuple[bytes, str]:
        """(bytes, media type) of the manifest or index at `target` (a tag or digest)."""
        what = f"manifest {target}"
        headers = {"Accept": ACCEPT}
        with self._get(ref, f"manifests/{target}", credentials, headers, what, insecure=insecure, retries=retries) as response:
            body = _read_limited(ref, response, MANIFEST_MAX_BYTES, what)
            content_type = response.headers.get("content-type", "")
        return body, _manifest_media_type(ref, body, content_type)

    def _pick_platform(self, ref: ImageReference, body: bytes) -> Descriptor:
        """The index entry for our platform, or NotFound listing what the index offers."""
        doc = _json_object(ref, body, "index")
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError(f"image {ref} on registry {ref.registry}: index has no 'manifests' list")
        descriptors = [_descriptor(ref, entry, "index entry") for entry in entries]
        for desc in descriptors:
            if desc.platform is not None and _platform_matches(self._platform, desc.platform):
                return desc
        available = ", ".join(_format_platform(d.platform) for d in descriptors) or "none"
        raise NotFound(
            f"image {ref} on registry {ref.registry} has no manifest for platform {self.platform} "
            f"(available: {available})"
        )

    # -- blobs -------------------------------------------------------------------------------

    def fetch_blob(
        self,
        ref: ImageReference,
        desc: Descriptor,
        dest: Path,
        credentials: Credentials | None = None,
        insecure: bool = False,
    ) -> int:
        """Download the blob into `dest`, resuming a prefix already there; verified at the end.

        Returns the bytes downloaded by this call. On a size or digest mismatch `dest` is deleted
        and DigestMismatchError raised.
        """
        _require_sha256(ref, desc)
        download = _Download(dest, desc)
        fetched = 0
        interruptions = 0
        while True:
            try:
                if not download.complete():
                    fetched += self._download(ref, desc, download, credentials, insecure)
            except _TransientError as exc:
                fetched += download.written_this_attempt
                interruptions += 1
                if interruptions > self.retries:
                    raise RegistryUnavailableError(
                        f"blob {desc.digest} of image {ref} on registry {ref.registry}: download "
                        f"kept failing after {self.retries} retries: {exc.cause}"
                    ) from None
                self._sleep(interruptions - 1, exc.retry_after)
                continue
            if download.verify():
                return fetched
            if download.resumed_from_old_prefix:
                download.restart()  # a stale partial file from an earlier attempt: try once from 0
                continue
            download.discard()
            got = (
                f"more than the {desc.size} bytes announced"
                if download.size > desc.size
                else f"{download.size} bytes with digest {download.digest()}, expected {desc.size} bytes"
            )
            raise DigestMismatchError(
                f"blob {desc.digest} of image {ref} on registry {ref.registry}: got {got}"
            )

    def _download(
        self,
        ref: ImageReference,
        desc: Descriptor,
        download: _Download,
        credentials: Credentials | None,
        insecure: bool = False,
    ) -> int:
        """One GET of the rest of the blob, appended to the file; the bytes it wrote."""
        offset = download.start_attempt()
        # identity: the bytes must hash to the digest, so no transparent compression
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        what = f"blob {desc.digest}"
        with self._get(ref, f"blobs/{desc.digest}", credentials, headers, what, (416,), insecure) as response:
            if response.status_code == 416 or (offset and response.status_code == 200):
                download.restart()  # the server will not resume: start over from byte 0
                if response.status_code == 416:
                    raise _TransientError("server refused the Range request (HTTP 416)")
            elif response.status_code == 206 and not _range_starts_at(response, offset):
                download.restart()
                raise _TransientError(f"unexpected Content-Range {response.headers.get('content-range')!r}")
            with download.appending() as out:
                try:
                    for chunk in response.iter_raw():  # as it arrives: an interruption loses nothing
                        if not out.write(chunk):
                            break  # more bytes than announced: verify() reports it
                except httpx.TransportError as exc:
                    raise _TransientError(f"download interrupted: {_describe(exc)}") from None
        return download.written_this_attempt

    def fetch_blob_bytes(
        self, ref: ImageReference, desc: Descriptor, credentials: Credentials | None = None, insecure: bool = False
    ) -> bytes:
        """A small blob (a config) in memory, verified against `desc`."""
        _require_sha256(ref, desc)
        what = f"blob {desc.digest}"
        with self._get(ref, f"blobs/{desc.digest}", credentials, {}, what, insecure=insecure) as response:
            data = _read_limited(ref, response, desc.size + 1, what)
        actual = _sha256(data)
        if len(data) != desc.size or actual != desc.digest:
            raise DigestMismatchError(
                f"blob {desc.digest} of image {ref} on registry {ref.registry}: got {len(data)} "
                f"bytes with digest {actual}, expected {desc.size} bytes"
            )
        return data

    # -- HTTP: retries, auth, errors ---------------------------------------------------------

    def base_url(self, registry: str, insecure: bool = False) -> str:
        """`scheme://host` of the registry's API (docker.io is served by registry-1.docker.io)."""
        host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        scheme = "http" if insecure or registry in self.insecure_registries else "https"
        return f"{scheme}://{host}"

    def _get(
        self,
        ref: ImageReference,
        path: str,
        credentials: Credentials | None,
        headers: dict[str, str],
        what: str,
        allow: tuple[int, ...] = (),
        insecure: bool = False,
        retries: int | None = None,
    ) -> _OpenResponse:
        """GET /v2/<repo>/<path> with auth and retries; a 2xx (or `allow`ed) streaming response."""
        url = f"{self.base_url(ref.registry, insecure)}/v2/{ref.repository}/{path}"
        retries = self.retries if retries is None else retries
        cause = ""
        retry_after: float | None = None
        for attempt in range(retries + 1):
            if attempt:
                self._sleep(attempt - 1, retry_after)
                retry_after = None
            try:
                response = self._send_authorized(ref, url, headers, credentials)
            except httpx.TransportError as exc:
                cause = _describe(exc)
                continue
            except _TransientError as exc:
                cause, retry_after = exc.cause, exc.retry_after
                continue
            if response.status_code in RETRY_STATUSES:
                cause = f"HTTP {response.status_code}{_error_detail(response)}"
                retry_after = _retry_after(response)
                response.close()
                continue
            if response.status_code in allow or response.is_success:
                return _OpenResponse(response)
            self._raise_for_status(ref, response, what)
        raise RegistryUnavailableError(
            f"image {ref}: registry {ref.registry} unavailable ({what}) after {retries} retries: {cause}"
        )

    def _send_authorized(
        self, ref: ImageReference, url: str, headers: dict[str, str], credentials: Credentials | None
    ) -> httpx.Response:
        """Send with a cached Authorization if we have one; on 401 answer the challenge once."""
        key = (ref.registry, f"repository:{ref.repository}:pull", credentials)
        if credentials is not None and credentials.registry_token:
            # A bearer token the caller already got for this registry: no challenge to answer.
            return self._accepted(ref, credentials, self._stream(url, headers, f"Bearer {credentials.registry_token}"))
        cached = self._cached_token(key)
        response = self._stream(url, headers, cached)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("www-authenticate", "")
        detail = _error_detail(response)
        response.close()
        self._drop_token(key)
        token = self._authenticate(ref, challenge, credentials, detail)
        response = self._accepted(ref, credentials, self._stream(url, headers, token.header))
        self._store_token(key, token)
        return response

    def _accepted(
        self, ref: ImageReference, credentials: Credentials | None, response: httpx.Response
    ) -> httpx.Response:
        """`response`, unless the registry still answered 401 to our final Authorization."""
        if response.status_code != 401:
            return response
        detail = _error_detail(response)
        response.close()
        raise self._unauthenticated(ref, credentials, detail)

    def _stream(self, url: str, headers: dict[str, str], authorization: str | None) -> httpx.Response:
        all_headers = dict(headers)
        if authorization:
            all_headers["Authorization"] = authorization
        request = self._client.build_request("GET", url, headers=all_headers)
        return self._client.send(request, stream=True)

    def _authenticate(
        self, ref: ImageReference, challenge: str, credentials: Credentials | None, detail: str
    ) -> _Token:
        """The Authorization to retry with, from a `WWW-Authenticate` challenge."""
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if credentials is None:
                raise self._unauthenticated(ref, None, detail)
            return _Token(_basic(credentials), float("inf"))
        if scheme == "bearer" and params.get("realm"):
            return self._fetch_token(ref, params, credentials)
        raise UnauthenticatedError(
            f"image {ref}: registry {ref.registry} asks for unsupported authentication {challenge!r}{detail}"
        )

    def _fetch_token(
        self, ref: ImageReference, params: dict[str, str], credentials: Credentials | None
    ) -> _Token:
        """GET a bearer token from the challenge's realm (basic auth when we have credentials)."""
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        query.setdefault("scope", f"repository:{ref.repository}:pull")
        if credentials is not None and credentials.identity_token:
            # OAuth2 refresh-token grant, as docker does with an identity token.
            form = {**query, "grant_type": "refresh_token", "refresh_token": credentials.identity_token,
                    "client_id": OAUTH_CLIENT_ID}
            response = self._client.post(params["realm"], data=form)
        else:
            auth = (credentials.username, credentials.password) if credentials else None
            response = self._client.get(params["realm"], params=query, auth=auth)
        if response.status_code in RETRY_STATUSES:
            raise _TransientError(
                f"token server {params['realm']}: HTTP {response.status_code}", _retry_after(response)
            )
        if response.status_code in (401, 403):
            raise self._unauthenticated(ref, credentials, f" (token server: HTTP {response.status_code})")
        if not response.is_success:
            raise RegistryError(
                f"image {ref}: token server {params['realm']} for registry {ref.registry} answered "
                f"HTTP {response.status_code}"
            )
        try:
            doc = response.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(
                f"image {ref}: token server {params['realm']} for registry {ref.registry} returned no token"
            )
        expires_in = doc.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 60.0
        return _Token(f"Bearer {token}", time.monotonic() + max(lifetime - 10.0, lifetime / 2))

    @staticmethod
    def _unauthenticated(
        ref: ImageReference, credentials: Credentials | None, detail: str
    ) -> UnauthenticatedError:
        if credentials is None:
            return UnauthenticatedError(
                f"credentials are required to pull image {ref} from registry {ref.registry} "
                f"(or the repository does not exist){detail}"
            )
        return UnauthenticatedError(
            f"credentials rejected by registry {ref.registry} for image {ref} ({credentials.describe()}){detail}"
        )

    @staticmethod
    def _raise_for_status(ref: ImageReference, response: httpx.Response, what: str) -> None:
        """Turn an unsuccessful, non-retryable answer into the matching CRIError."""
        status = response.status_code
        detail = _error_detail(response)
        codes = _error_codes(response)
        response.close()
        if status == 403:
            raise PermissionDeniedError(
                f"access to image {ref} denied by registry {ref.registry} ({what}: HTTP 403){detail}"
            )
        if status == 404 or codes & NOT_FOUND_CODES:
            raise NotFound(f"image {ref} not found on registry {ref.registry} ({what}){detail}")
        raise RegistryError(f"image {ref}: registry {ref.registry} answered HTTP {status} for {what}{detail}")

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        """Back off before retry number `attempt + 1`; a small Retry-After wins."""
        delay = self.backoff * 2**attempt
        if retry_after is not None and 0 <= retry_after <= RETRY_AFTER_MAX:
            delay = retry_after
        time.sleep(delay)

    def _cached_token(self, key: tuple[str, str, Credentials | None]) -> str | None:
        with self._tokens_lock:
            token = self._tokens.get(key)
            if token is None or token.expires <= time.monotonic():
                return None
            return token.header

    def _store_token(self, key: tuple[str, str, Credentials | None], token: _Token) -> None:
        with self._tokens_lock:
            self._tokens[key] = token

    def _drop_token(self, key: tuple[str, str, Credentials | None]) -> None:
        with self._tokens_lock:
            self._tokens.pop(key, None)


class _OpenResponse:
    """A streaming response as a context manager that always closes it."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __enter__(self) -> httpx.Response:
        return self.response

    def __exit__(self, *exc: object) -> None:
        self.response.close()


class _Download:
    """The partial file of one blob download, hashed as it grows."""

    def __init__(self, dest: Path, desc: Descriptor) -> None:
        self.dest = dest
        self.desc = desc
        self.size = 0
        self.written_this_attempt = 0
        self._hash = hashlib.sha256()
        self.resumed_from_old_prefix = False
        self._out: BinaryIO | None = None
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        """Hash what `dest` already holds; drop it if it cannot be a prefix of the blob."""
        try:
            existing = self.dest.stat().st_size
        except FileNotFoundError:
            return
        if existing > self.desc.size:
            self.dest.unlink()
            return
        with self.dest.open("rb") as f:
            for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
                self._hash.update(chunk)
                self.size += len(chunk)
        self.resumed_from_old_prefix = self.size > 0

    def complete(self) -> bool:
        return self.dest.exists() and self.size == self.desc.size

    def start_attempt(self) -> int:
        """Begin a GET: the offset to ask for (the file is created if missing)."""
        self.written_this_attempt = 0
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.dest.touch()
        return self.size

    def restart(self) -> None:
        """Throw the file away and start from byte 0."""
        self.dest.write_bytes(b"")
        self.size = 0
        self._hash = hashlib.sha256()
        self.resumed_from_old_prefix = False

    @contextlib.contextmanager
    def appending(self) -> Iterator[_Download]:
        """Keep the file open for appending while a response streams in."""
        out = self.dest.open("ab")
        self._out = out
        try:
            yield self
        finally:
            self._out = None
            out.close()

    def write(self, chunk: bytes) -> bool:
        """Append a chunk; False once the file is longer than the descriptor's size."""
        assert self._out is not None, "write() outside appending()"
        self._out.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)
        self.written_this_attempt += len(chunk)
        return self.size <= self.desc.size

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def verify(self) -> bool:
        return self.size == self.desc.size and self.digest() == self.desc.digest

    def discard(self) -> None:
        self.dest.unlink(missing_ok=True)


# -- helpers ---------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _require_sha256(ref: ImageReference, desc: Descriptor) -> None:
    if not _SHA256_RE.fullmatch(desc.digest):
        raise ManifestError(
            f"image {ref} on registry {ref.registry}: blob digest {desc.digest!r} is not a sha256 "
            "digest (only sha256 is supported)"
        )


def _read_limited(ref: ImageReference, response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body of a streaming response, refusing more than `limit` bytes."""
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_bytes():
            total += len(chunk)
            if total > limit:
                raise ManifestError(
                    f"image {ref} on registry {ref.registry}: {what} is larger than {limit} bytes"
                )
            parts.append(chunk)
    except httpx.TransportError as exc:
        raise RegistryUnavailableError(
            f"image {ref}: reading {what} from registry {ref.registry} failed: {_describe(exc)}"
        ) from None
    return b"".join(parts)


def _manifest_media_type(ref: ImageReference, body: bytes, content_type: str) -> str:
    """The media type of a manifest: its `mediaType` field, else Content-Type, else its shape."""
    doc = _json_object(ref, body, "manifest")
    declared = doc.get("mediaType")
    header = content_type.split(";")[0].strip().lower()
    if doc.get("schemaVersion") == 1 or declared in MEDIA_DOCKER_SCHEMA1 or header in MEDIA_DOCKER_SCHEMA1:
        raise ManifestError(
            f"image {ref} on registry {ref.registry} has a Docker schema 1 manifest, which is not "
            "supported (deprecated format): push the image again with a current tool"
        )
    if isinstance(declared, str) and declared:
        media_type = declared
    elif header in INDEX_TYPES + MANIFEST_TYPES:
        media_type = header
    elif isinstance(doc.get("manifests"), list):
        media_type = MEDIA_OCI_INDEX
    elif "config" in doc and "layers" in doc:
        media_type = MEDIA_OCI_MANIFEST
    else:
        media_type = header or "unknown"
    if media_type not in INDEX_TYPES + MANIFEST_TYPES:
        raise ManifestError(
            f"image {ref} on registry {ref.registry}: unsupported manifest media type {media_type!r}"
        )
    return media_type


def _json_object(ref: ImageReference, body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ManifestError(f"image {ref} on registry {ref.registry}: {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"image {ref} on registry {ref.registry}: {what} is not a JSON object")
    return doc


def _parse_manifest(ref: ImageReference, body: bytes) -> tuple[Descriptor, list[Descriptor]]:
    """(config, layers) of an OCI or Docker v2s2 image manifest."""
    doc = _json_object(ref, body, "manifest")
    config = _descriptor(ref, doc.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(
            f"image {ref} on registry {ref.registry} is not a container image "
            f"(config media type {config.media_type!r})"
        )
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError(f"image {ref} on registry {ref.registry}: manifest has no 'layers' list")
    return config, [_descriptor(ref, layer, "layer") for layer in layers]


def _descriptor(ref: ImageReference, raw: object, what: str) -> Descriptor:
    """A Descriptor from its JSON form, checked."""
    if not isinstance(raw, dict):
        raise ManifestError(f"image {ref} on registry {ref.registry}: {what} descriptor missing")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if (
        not isinstance(media_type, str)
        or not isinstance(digest, str)
        or not isinstance(size, int)
        or size < 0
    ):
        raise ManifestError(
            f"image {ref} on registry {ref.registry}: malformed {what} descriptor {json.dumps(raw)[:200]}"
        )
    if not _SHA256_RE.fullmatch(digest):
        raise ManifestError(
            f"image {ref} on registry {ref.registry}: {what} digest {digest!r} is not a sha256 "
            "digest (only sha256 is supported)"
        )
    return Descriptor(
        media_type, digest, size, _str_dict(raw.get("platform")), _str_dict(raw.get("annotations"))
    )


def _str_dict(raw: object) -> dict[str, str] | None:
    if not isinstance(raw, dict):
        return None
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _parse_platform(text: str) -> tuple[str, str, str]:
    """'os/arch[/variant]' -> (os, arch, variant or '')."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(f"platform {text!r} is not 'os/arch' or 'os/arch/variant'")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def _platform_matches(want: tuple[str, str, str], platform: dict[str, str]) -> bool:
    """os and architecture must match; a wanted variant too (amd64 ignores it, arm64 means v8)."""
    os_name, arch, variant = want
    if platform.get("os") != os_name or platform.get("architecture") != arch:
        return False
    if arch == "amd64" or not variant:
        return True
    have = platform.get("variant") or ("v8" if arch == "arm64" else "")
    return have == variant


def _format_platform(platform: dict[str, str] | None) -> str:
    if not platform:
        return "unknown"
    parts = [platform.get("os", "?"), platform.get("architecture", "?")]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(parts)


def _range_starts_at(response: httpx.Response, offset: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("content-range", ""))
    return match is not None and int(match.group(1)) == offset


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="..."` -> ("bearer", {realm: ..., service: ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM_RE.finditer(rest)
    }
    return scheme.lower(), params


def _basic(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None  # absent, or an HTTP date: use our own backoff


def _error_body(response: httpx.Response) -> list[dict[str, Any]]:
    """The registry's `{"errors": [...]}` list, if the (small) body has one."""
    try:
        response.read()
        doc = json.loads(response.content[:65536])
    except (ValueError, httpx.HTTPError):
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _error_codes(response: httpx.Response) -> set[str]:
    return {str(e.get("code")) for e in _error_body(response)}


def _error_detail(response: httpx.Response) -> str:
    """': message (CODE)' from the registry's error body, or '' when there is none."""
    errors = _error_body(response)
    if not errors:
        return ""
    return ": " + "; ".join(f"{e.get('message', '')} ({e.get('code', '?')})" for e in errors)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
