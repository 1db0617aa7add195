"""PullImage's work: resolve the manifest, fetch and unpack layers in parallel, commit the record.

Each step is a child span of the CRI call: `resolve` (with one `pull_source` per place tried:
the mirrors of registries.conf, then the registry), one `fetch_layer` and one `unpack_layer` per
layer, `commit`. Two pulls of the same image, or of images sharing a layer, do the work once:
the second waits on the first's lock and then finds everything in place.
"""

from __future__ import annotations

import contextvars
import json
import logging
import multiprocessing
import os
import select
import shutil
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycrio.config import ImageConfig
from pycrio.errors import CRIError, DataLoss, NotFound, PermissionDenied
from pycrio.images.reference import ImageReference, reference_at, resolve_candidates
from pycrio.images.registries_conf import PullSource, RegistriesConf
from pycrio.images.registry import Credentials, Descriptor, RegistryClient, ResolvedImage
from pycrio.images.store import ImageRecord, ImageStore
from pycrio.images.unpack import LayerStats, unpack_layer
from pycrio.locks import KeyedLocks
from pycrio.tracing import step_span

log = logging.getLogger("pycrio.images")

# A source followed by another (a mirror) gets one retry: the next source is the fallback.
MIRROR_RETRIES = 1


@dataclass(frozen=True)
class _Via:
    """Where an image's content is fetched from: its name there, the credentials sent, plain HTTP."""

    ref: ImageReference
    credentials: Credentials | None
    insecure: bool


def exit_with_daemon(daemon_pid: int) -> None:
    """Pool worker initializer: exit as soon as the daemon process is gone.

    Workers are children of the forkserver, not of the daemon, and hold both ends of their task
    pipe, so a SIGKILLed daemon would leave them (and the forkserver) waiting forever.
    """
    try:
        pidfd = os.pidfd_open(daemon_pid)
    except OSError:  # already gone
        os._exit(0)

    def watch() -> None:
        select.select([pidfd], [], [])  # readable once the process has exited
        os._exit(0)

    threading.Thread(target=watch, name="pycrio-daemon-watch", daemon=True).start()


class PullStats:
    """Cumulative pull counters for metrics (CRI-O's image_pulls_* and image_layer_reuse_*)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"pulls_succeeded": 0, "pulls_failed": 0, "layers_fetched": 0, "layers_reused": 0,
                        "bytes_fetched": 0}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class ImagePuller:
    """Pulls images from registries into an ImageStore.

    Layers are unpacked in worker processes: unpacking is CPU-bound Python (tar parsing,
    decompression, hashing) and threads would serialise on the GIL with the downloads and the
    CRI calls of the daemon.
    """

    def __init__(self, store: ImageStore, client: RegistryClient, config: ImageConfig) -> None:
        self.store = store
        self.client = client
        self.config = config
        self._locks = KeyedLocks()
        self._unpackers: ProcessPoolExecutor | None = None
        self._unpackers_lock = threading.Lock()
        self.stats = PullStats()
        # registries.conf as last loaded; replaced whole on SIGHUP, read once per pull.
        self.registries = RegistriesConf()

    def close(self) -> None:
        """Stop the unpack worker processes (they start again on the next pull)."""
        with self._unpackers_lock:
            if self._unpackers is not None:
                self._unpackers.shutdown(wait=True, cancel_futures=True)
                self._unpackers = None

    def _unpack(self, blob: Path, media_type: str, dest: Path) -> LayerStats:
        with self._unpackers_lock:
            if self._unpackers is None:
                # forkserver: forking a process that runs gRPC threads is not safe.
                self._unpackers = ProcessPoolExecutor(
                    max_workers=max(1, min(self.config.max_parallel_downloads, os.cpu_count() or 1)),
                    mp_context=multiprocessing.get_context("forkserver"),
                    initializer=exit_with_daemon,
                    initargs=(os.getpid(),),
                )
            pool = self._unpackers
        return pool.submit(unpack_layer, blob, media_type, dest).result()

    def pull(self, image: str, credentials: Credentials | None = None) -> ImageRecord:
        """Pull `image` (short names tried against each search registry in order)."""
        try:
            record = self._pull_candidates(image, credentials)
        except Exception:
            self.stats.add("pulls_failed")
            raise
        self.stats.add("pulls_succeeded")
        return record

    def search_registries(self) -> list[str]:
        """The registries short names are tried against (pycrio's, or registries.conf's)."""
        return self.registries.search_list(self.config.unqualified_search_registries)

    def _pull_candidates(self, image: str, credentials: Credentials | None) -> ImageRecord:
        registries = self.registries
        candidates = resolve_candidates(image, registries.search_list(self.config.unqualified_search_registries))
        missing: list[NotFound] = []
        for reference in candidates:
            try:
                return self._pull(reference, credentials, registries)
            except NotFound as exc:
                log.info("%s", exc.message)
                missing.append(exc)
        if len(missing) == 1:
            raise missing[0]
        tried = ", ".join(str(c) for c in candidates)
        raise NotFound(f"image {image!r} not found in any search registry (tried {tried})")

    def _pull(self, ref: ImageReference, credentials: Credentials | None, registries: RegistriesConf) -> ImageRecord:
        with step_span("resolve", **{"image.reference": str(ref), "registry": ref.registry}) as span:
            via, resolved = self._resolve(ref, credentials, registries)
            span.set_attribute("manifest.digest", resolved.manifest_digest)
            span.set_attribute("layers", len(resolved.layers))
            span.set_attribute("source", str(via.ref))
        # Pinned from before anything present is reused until the record is committed: removing
        # another image that shares a layer or blob must not delete it in between.
        blobs = [resolved.config.digest, *(d.digest for d in resolved.layers)]
        with self._locks.hold(resolved.manifest_digest), self.store.pinned(*blobs) as pins:
            config = json.loads(self._config_blob(resolved, via))
            diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
            if len(diff_ids) != len(resolved.layers):
                raise DataLoss(
                    f"image {ref}: config lists {len(diff_ids)} layers, manifest {len(resolved.layers)}"
                )
            pins.add(*diff_ids)
            self._layers(resolved, diff_ids, via)
            with step_span("commit", **{"image.id": resolved.config.digest}):
                return self.store.add(self._record(ref, resolved, diff_ids, config))

    def _resolve(
        self, ref: ImageReference, credentials: Credentials | None, registries: RegistriesConf
    ) -> tuple[_Via, ResolvedImage]:
        """The manifest from the first source that has it: the mirrors in order, then the
        registry (or its rewritten location). Only the last source's failure is final."""
        entry = registries.find(ref.name)
        if entry is not None and entry.blocked:
            raise PermissionDenied(
                f"image {ref}: pulling from registry {entry.prefix} is blocked by {entry.source}"
            )
        suffix = (f":{ref.tag}" if ref.tag else "") + (f"@{ref.digest}" if ref.digest else "")
        sources = registries.pull_sources(ref.name, suffix, ref.digest is not None, self.client.insecure_registries)
        if not sources:
            where = entry.source if entry is not None else "registries.conf"
            raise PermissionDenied(f"image {ref}: every location configured for it is blocked by {where}")
        failures: list[str] = []
        for index, source in enumerate(sources):
            last = index == len(sources) - 1
            try:
                return self._try_source(source, credentials, None if last else MIRROR_RETRIES)
            except CRIError as exc:
                if last:
                    if not failures:
                        raise
                    also = "; ".join(failures)
                    raise type(exc)(f"{exc.message} (mirrors also failed: {also})", exc.code) from None
                failures.append(f"{source.reference}: {exc.message}")
                level = logging.INFO if isinstance(exc, NotFound) else logging.WARNING
                log.log(level, "image %s: %s %s failed, trying the next source: %s",
                        ref, "mirror" if source.mirror else "source", source.reference, exc.message)
        raise AssertionError("unreachable: the last source returns or raises")

    def _try_source(
        self, source: PullSource, credentials: Credentials | None, retries: int | None
    ) -> tuple[_Via, ResolvedImage]:
        attributes = {"registry.host": source.host, "image.reference": source.reference,
                      "mirror": source.mirror, "insecure": source.insecure}
        with step_span("pull_source", **attributes) as span:
            try:
                target = reference_at(source.reference)
                # The CRI credentials are for the registry asked; a mirror gets them only when
                # AuthConfig.server_address names it (as containerd does), else it is asked anonymously.
                if source.mirror and not (credentials is not None and credentials.for_host(target.registry)):
                    sent = None
                else:
                    sent = credentials
                resolved = self.client.resolve(target, sent, insecure=source.insecure, retries=retries)
            except CRIError as exc:
                span.set_attribute("outcome", exc.code.name.lower())
                raise
            span.set_attribute("outcome", "found")
            span.set_attribute("manifest.digest", resolved.manifest_digest)
            return _Via(target, sent, source.insecure), resolved

    def _config_blob(self, resolved: ResolvedImage, via: _Via) -> bytes:
        desc = resolved.config
        if self.store.blobs.has(desc.digest, desc.size):
            return self.store.blobs.read(desc.digest)
        data = self.client.fetch_blob_bytes(via.ref, desc, via.credentials, via.insecure)
        self.store.blobs.write(desc.digest, data)
        return data

    def _layers(self, resolved: ResolvedImage, diff_ids: list[str], via: _Via) -> None:
        jobs = [
            (lambda d=desc, i=diff_id: self._layer(via, d, i))
            for desc, diff_id in zip(resolved.layers, diff_ids)
        ]
        workers = min(self.config.max_parallel_downloads, len(jobs)) or 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull") as pool:
            # Each job runs in a copy of this call's context: its spans are children of the
            # PullImage span and its log lines carry the call's request id.
            futures = [pool.submit(contextvars.copy_context().run, job) for job in jobs]
            for future in futures:
                future.result()

    def _layer(self, via: _Via, desc: Descriptor, diff_id: str) -> None:
        ref = via.ref
        layer_dir = self.store.layer_path(diff_id)
        with self._locks.hold(diff_id):
            with step_span("fetch_layer", digest=desc.digest, size=desc.size) as span:
                fetched = self._fetch(via, desc, need_blob=not layer_dir.exists())
                span.set_attribute("bytes_fetched", fetched)
                span.set_attribute("cached", fetched == 0)
            if fetched:
                self.stats.add("layers_fetched")
                self.stats.add("bytes_fetched", fetched)
            else:
                self.stats.add("layers_reused")
            if layer_dir.exists():
                return
            with step_span("unpack_layer", digest=desc.digest, diff_id=diff_id) as span:
                staging = layer_dir.with_name(f".unverified-{layer_dir.name}")
                shutil.rmtree(staging, ignore_errors=True)
                stats = self._unpack(self.store.blobs.path(desc.digest), desc.media_type, staging)
                if stats.diff_id != diff_id:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise DataLoss(f"image {ref}: layer {desc.digest} unpacks to {stats.diff_id}, config says {diff_id}")
                os.rename(staging, layer_dir)
                span.set_attribute("files", stats.files)
                span.set_attribute("bytes", stats.bytes)

    def _fetch(self, via: _Via, desc: Descriptor, need_blob: bool) -> int:
        """Make sure the blob is stored if still needed; the bytes downloaded now (0: cached)."""
        if not need_blob or self.store.blobs.has(desc.digest, desc.size):
            return 0
        partial = self.store.blobs.partial_path(desc.digest)
        fetched = self.client.fetch_blob(via.ref, desc, partial, via.credentials, via.insecure)
        self.store.blobs.commit(desc.digest, desc.size, partial, hashed=True)
        return fetched

    @staticmethod
    def _record(
        ref: ImageReference, resolved: ResolvedImage, diff_ids: list[str], config: dict[str, Any]
    ) -> ImageRecord:
        """The record under the name asked for, wherever the content came from."""
        return ImageRecord(
            id=resolved.config.digest,
            repo_tags=[f"{ref.name}:{ref.tag}"] if ref.tag else [],
            repo_digests=[f"{ref.name}@{resolved.repo_digest}"],
            manifest_digest=resolved.manifest_digest,
            config_digest=resolved.config.digest,
            layer_blobs=[{"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in resolved.layers],
            diff_ids=diff_ids,
            size=resolved.config.size + sum(d.size for d in resolved.layers),
            user=str(config.get("config", {}).get("User", "")),
        )
