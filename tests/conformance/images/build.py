"""Offline stand-ins for every image critest (cri-tools v1.37.0) pulls, pushed under their names.

critest pulls its images from registry.k8s.io, k8s.gcr.io, gcr.io and public.ecr.aws. Each is
rebuilt here from Debian's dynamic busybox (with its glibc) and three static Go helpers of our
own (src/: pause, nginx, nnp), into one OCI layout with umoci, and pushed with skopeo to a
loopback registry as `<registry>/<original host>/<path>:<tag>`, so that a runtime with one mirror
per source registry (`<host>` -> `<registry>/<host>`) pulls them by their original names.
README.md says which spec needs what of each image.

    python tests/conformance/images/build.py --registry 127.0.0.1:5000 [--cache build/conformance/images]

Builds are cached in the cache directory: an image is rebuilt only when its inputs (recipe,
files, Go sources and toolchain, the busybox .deb, the host's libc, build.py itself) change.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
if __package__ in (None, ""):  # run as a script: make the `tests` package importable
    sys.path.insert(0, str(REPO))

from tests.registry_fixture import ImageBuilder, run  # noqa: E402

DEFAULT_CACHE = REPO / "build" / "conformance" / "images"
FILES = HERE / "files"
GO_SOURCES = HERE / "src"
GO_PROGRAMS = ("pause", "nginx", "nnp")

# The registries critest pulls from: the runner writes one mirror per host.
SOURCE_REGISTRIES = ("registry.k8s.io", "k8s.gcr.io", "gcr.io", "public.ecr.aws")

E2E = "registry.k8s.io/e2e-test-images/"
STAGING = "gcr.io/k8s-staging-cri-tools/"
ECR = "public.ecr.aws/docker/library/"

# Pinned to an upstream manifest digest: no rebuild can have it, so its spec fails everywhere here.
UNBUILDABLE = {
    STAGING + "test-image-digest@sha256:9700f9a2f5bf2c45f2f605a0bd3bce7cf37420ec9d3ed50ac2758413308766bf":
        "pinned to an upstream digest, which no offline rebuild can reproduce",
}

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABEL = "io.pycrio.conformance.stand-in"
LAYER_MTIME = 1704067200  # 2024-01-01: added layers are byte-for-byte the same on every rebuild


@dataclass(frozen=True)
class Recipe:
    """One image in the layout: a base plus files, Go helpers and config changes."""

    tag: str  # its name in the OCI layout
    base: str = "busybox"  # the layout tag it starts from; "empty" is nothing at all
    overlays: tuple[str, ...] = ()  # directories under files/ copied over the root
    programs: tuple[tuple[str, str, int], ...] = ()  # (Go helper, path in the image, mode)
    files: tuple[tuple[str, str], ...] = ()  # (path, content): marker files
    dirs: tuple[tuple[str, int, int], ...] = ()  # (path, mode, owner uid=gid)
    config: tuple[str, ...] = ()  # umoci config arguments

    @property
    def changes_rootfs(self) -> bool:
        return bool(self.overlays or self.programs or self.files or self.dirs)


def _marked(tag: str, path: str, content: str = "") -> Recipe:
    """busybox plus one marker file: a distinct image (cri-tools' image-test: `ADD $TEST $TEST`)."""
    return Recipe(tag, files=((path, content),))


def _user(tag: str, user: str) -> Recipe:
    """busybox with only its config's User changed (cri-tools' image-user)."""
    return Recipe(tag, config=("--config.user", user))


# In build order: every base before the images made from it.
RECIPES: tuple[Recipe, ...] = (
    Recipe("busybox", base="empty"),  # built by StandInBuilder._build_busybox_base
    Recipe(
        "pause",
        base="empty",
        programs=(("pause", "/pause", 0o755),),
        config=("--config.entrypoint", "/pause", "--config.user", "65535:65535"),
    ),
    Recipe(
        "nginx",
        overlays=("nginx",),
        programs=(("nginx", "/usr/sbin/nginx", 0o755),),
        dirs=(("/var/run", 0o755, 0), ("/var/log/nginx", 0o755, 0)),
        config=(
            "--config.cmd", "nginx", "--config.cmd", "-g", "--config.cmd", "daemon off;",
            "--config.exposedports", "80/tcp",
        ),
    ),
    Recipe("hostnet-nginx", base="nginx", overlays=("hostnet-nginx",), config=("--config.exposedports", "12003/tcp")),
    Recipe(
        "httpd",
        overlays=("httpd",),
        config=(
            "--config.cmd", "httpd-foreground",
            "--config.exposedports", "80/tcp",
            "--config.workingdir", "/usr/local/apache2",
        ),
    ),
    Recipe(
        "nonewprivs",
        programs=(("nnp", "/usr/local/bin/nnp", 0o4755),),
        config=("--clear", "config.cmd", "--config.entrypoint", "/usr/local/bin/nnp"),
    ),
    _user("user-uid", "1002"),
    _user("user-username", "www-data"),
    _user("user-uid-group", "1003:1004"),
    _user("user-username-group", "www-data:1004"),
    Recipe(
        "predefined-group",
        overlays=("predefined-group",),
        dirs=(("/home/default-user", 0o755, 1000),),
        config=("--config.user", "1000"),
    ),
    _marked("test-image-latest", "/test-image-latest"),
    _marked("test-image-tag-test", "/test"),
    _marked("test-image-tag-all", "/all"),
    _marked("test-image-1", "/test-image-1"),
    _marked("test-image-2", "/test-image-2"),
    _marked("test-image-3", "/test-image-3"),
    _marked("test-image-tags", "/same-image"),
    *(
        _marked(f"ecr-busybox-{variant}", "/etc/stand-in", f"{ECR}busybox:{variant}\n")
        for variant in ("1.35.0-glibc", "1-uclibc", "1", "1-glibc", "1-musl")
    ),
)

# Every reference critest pulls (but the digest-pinned one) -> the layout tag standing in for it.
IMAGES: dict[str, str] = {
    # default image of most specs
    E2E + "busybox:1.29-2": "busybox",
    # port mapping, port-forward, HostPID/PodPID/ContainerPID
    E2E + "nginx:1.14-2": "nginx",
    # multiple containers in a pod
    E2E + "httpd:2.4.39-4": "httpd",
    # NoNewPrivs
    E2E + "nonewprivs:1.3": "nonewprivs",
    # "same image from different registries": one image under two names
    "registry.k8s.io/pause:3.9": "pause",
    "k8s.gcr.io/pause:3.9": "pause",
    # port-forward in the host network (nginx on 12003)
    STAGING + "hostnet-nginx-amd64:latest": "hostnet-nginx",
    # image status Uid/Username
    STAGING + "test-image-user-uid:latest": "user-uid",
    STAGING + "test-image-user-username:latest": "user-username",
    STAGING + "test-image-user-uid-group:latest": "user-uid-group",
    STAGING + "test-image-user-username-group:latest": "user-username-group",
    # SupplementalGroupsPolicy
    STAGING + "test-image-predefined-group:latest": "predefined-group",
    # image manager, image consistency, image volumes
    STAGING + "test-image-latest:latest": "test-image-latest",
    STAGING + "test-image-tag:test": "test-image-tag-test",
    STAGING + "test-image-tag:all": "test-image-tag-all",
    STAGING + "test-image-1:latest": "test-image-1",
    STAGING + "test-image-2:latest": "test-image-2",
    STAGING + "test-image-3:latest": "test-image-3",
    STAGING + "test-image-tags:1": "test-image-tags",
    STAGING + "test-image-tags:2": "test-image-tags",
    STAGING + "test-image-tags:3": "test-image-tags",
    # benchmarks (image listing and pulling)
    **{f"{ECR}busybox:{v}": f"ecr-busybox-{v}" for v in ("1.35.0-glibc", "1-uclibc", "1", "1-glibc", "1-musl")},
}


def mirror_reference(registry: str, original: str) -> str:
    """Where an original reference is pushed: `<registry>/<original host>/<path>:<tag>`."""
    return f"{registry}/{original}"


def mirror_location(registry: str, host: str) -> str:
    """The mirror of one source registry (`registries.conf` `[[registry.mirror]] location`)."""
    return f"{registry}/{host}"


def split_reference(reference: str) -> tuple[str, str]:
    """(name, tag) of a tagged reference: `registry.k8s.io/pause:3.9` -> (registry.k8s.io/pause, 3.9)."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        raise ValueError(f"{reference} has no tag")
    return name, tag


@dataclass(frozen=True)
class _Registry:
    """What ImageBuilder._push needs of a registry: an address; no credentials."""

    address: str
    credentials: tuple[str, str] | None = None


@dataclass(frozen=True)
class Built:
    """A stand-in in the layout: its tag, how long it took (0 if cached), its layers' size."""

    tag: str
    seconds: float
    cached: bool
    size: int  # compressed layer bytes
    layers: tuple[tuple[str, int], ...] = ()  # (digest, size), base first


@dataclass(frozen=True)
class Pushed:
    reference: str  # the original reference
    target: str  # where it went
    digest: str
    seconds: float


class StandInBuilder(ImageBuilder):
    """ImageBuilder's layout and umoci helpers, with the stand-in recipes and an input-keyed cache."""

    def __init__(self, cache: Path, log: Callable[[str], None] = print) -> None:
        super().__init__(cache, registry=None)  # type: ignore[arg-type]  # every push names its registry
        self.log = log
        self.state_file = cache / "state.json"
        self.state: dict[str, dict[str, str]] = {"images": {}, "programs": {}}
        if self.state_file.exists():
            self.state.update(json.loads(self.state_file.read_text()))
        self.keys: dict[str, str] = {"empty": "empty"}
        self.debs = cache / "debs"
        self.bin = cache / "bin"
        self.built: dict[str, Built] = {}

    # -- the whole set ---------------------------------------------------------------------

    def build_all(self) -> dict[str, Built]:
        programs = self.build_programs()
        rebuilt = False
        for recipe in RECIPES:
            key = self._key(recipe, programs)
            cached = self.state["images"].get(recipe.tag) == key and self._has_tag(recipe.tag)
            started = time.monotonic()
            if not cached:
                if recipe.tag == "busybox":
                    self._build_busybox_base()
                else:
                    self._build(recipe)
                self.state["images"][recipe.tag] = key
                self._save_state()
                rebuilt = True
            seconds = 0.0 if cached else time.monotonic() - started
            layout = self._describe(recipe.tag)
            layers = tuple(zip(layout.layers, layout.layer_sizes))
            self.built[recipe.tag] = Built(recipe.tag, seconds, cached, sum(layout.layer_sizes), layers)
            if not cached:
                self.log(f"built  {recipe.tag:<24} {_size(self.built[recipe.tag].size):>9}  {seconds:6.2f}s")
        if rebuilt:
            self._umoci("gc", "--layout", str(self.layout))
        else:
            self.log(f"build  all {len(RECIPES)} images cached in {self.layout}")
        return self.built

    # -- Go helpers --------------------------------------------------------------------------

    def build_programs(self) -> dict[str, str]:
        """Build the static Go helpers (cached on their sources and toolchain); name -> sha256."""
        go = shutil.which("go") or "/usr/local/go/bin/go"
        env = {**os.environ, "CGO_ENABLED": "0", "GOOS": "linux", "GOARCH": "amd64", "GOTOOLCHAIN": "local",
               "GOFLAGS": "-mod=mod"}
        goversion = run(go, "env", "GOVERSION").strip()
        sources = _tree_digest(GO_SOURCES)
        self.bin.mkdir(parents=True, exist_ok=True)
        digests: dict[str, str] = {}
        for name in GO_PROGRAMS:
            key = _digest(f"{goversion}\n{sources}\n{name}")
            output = self.bin / name
            if self.state["programs"].get(name) != key or not output.exists():
                started = time.monotonic()
                result = subprocess.run(
                    [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(output), f"./{name}"],
                    cwd=GO_SOURCES, env=env, capture_output=True, text=True,
                )
                if result.returncode != 0:
                    raise RuntimeError(f"go build ./{name} failed:\n{result.stderr}")
                self.state["programs"][name] = key
                self._save_state()
                self.log(f"go     {name:<24} {_size(output.stat().st_size):>9}  {time.monotonic() - started:6.2f}s")
            digests[name] = _file_digest(output)
        return digests

    # -- busybox: Debian's dynamic busybox and its libc --------------------------------------

    def _busybox_deb(self) -> Path:
        """Debian's busybox .deb, downloaded once: `apt-get download`, never installed (it
        conflicts with the host's busybox-static, which other tests use)."""
        self.debs.mkdir(parents=True, exist_ok=True)
        debs = sorted(self.debs.glob("busybox_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", "busybox"], cwd=self.debs, check=True, capture_output=True)
            debs = sorted(self.debs.glob("busybox_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download busybox left no busybox_*.deb in {self.debs}")
        return debs[-1]

    def _busybox_tree(self) -> Path:
        """The unpacked .deb (dpkg-deb -x), redone when the .deb changes."""
        deb = self._busybox_deb()
        tree = self.debs / "busybox"
        stamp = tree / ".deb"
        if not stamp.exists() or stamp.read_text() != deb.name:
            shutil.rmtree(tree, ignore_errors=True)
            run("dpkg-deb", "-x", str(deb), str(tree))
            stamp.write_text(deb.name)
        return tree

    def _busybox_libs(self, binary: Path) -> list[tuple[str, Path]]:
        """(path in the image, host file) for each shared object `ldd` names, loader included."""
        libs = []
        for line in run("ldd", str(binary)).splitlines():
            words = line.split()
            path = words[2] if "=>" in words and len(words) > 2 else words[0] if words else ""
            if path.startswith("/"):
                libs.append((path, Path(path).resolve()))
        if not any("libc.so" in path for path, _ in libs):
            raise RuntimeError(f"ldd {binary} names no libc: is it the dynamic busybox?")
        return libs

    def _busybox_inputs(self) -> str:
        deb = self._busybox_deb()
        parts = [f"deb {deb.name} {_file_digest(deb)}"]
        binary = self._busybox_tree() / "bin" / "busybox"
        parts += [f"lib {path} {_file_digest(host)}" for path, host in self._busybox_libs(binary)]
        parts.append(f"files {_tree_digest(FILES / 'busybox')}")
        return "\n".join(parts)

    def _build_busybox_base(self) -> None:
        """The official busybox image's shape: every applet a hard link to /bin/busybox (a masked
        /bin/ls must not mask busybox itself), the dynamic libc, passwd/group, ipcs and pgrep."""
        tree = self._busybox_tree()
        bundle = self._unpack("empty", "busybox")
        rootfs = bundle / "rootfs"
        for directory, mode in (
            ("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("home", 0o755), ("lib", 0o755), ("lib64", 0o755),
            ("root", 0o700), ("tmp", 0o1777), ("usr/bin", 0o755), ("usr/sbin", 0o755), ("usr/local/bin", 0o755),
            ("var/spool/mail", 0o755), ("var/www", 0o755),
        ):
            (rootfs / directory).mkdir(parents=True, exist_ok=True)
            os.chmod(rootfs / directory, mode)
        busybox = rootfs / "bin" / "busybox"
        shutil.copy2(tree / "bin" / "busybox", busybox)
        os.chmod(busybox, 0o755)
        applets = run(str(busybox), "--list").split()
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                os.link(busybox, rootfs / "bin" / applet)
        for path, host in self._busybox_libs(tree / "bin" / "busybox"):
            target = rootfs / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(host, target)
        _copy_overlay(FILES / "busybox", rootfs)
        self._umoci("repack", "--image", self._image("busybox"), str(bundle))
        shutil.rmtree(bundle)
        self._umoci(
            "config", "--image", self._image("busybox"),
            "--os", "linux", "--architecture", "amd64",
            "--config.cmd", "sh", "--config.env", PATH_ENV,
            "--config.label", f"{LABEL}=busybox",
        )

    # -- the other recipes -------------------------------------------------------------------

    def _build(self, recipe: Recipe) -> None:
        config = [*recipe.config, "--config.label", f"{LABEL}={recipe.tag}"]
        if recipe.base == "empty":
            config = ["--os", "linux", "--architecture", "amd64", "--config.env", PATH_ENV, *config]
        if not recipe.changes_rootfs:
            self._umoci("config", "--image", self._image(recipe.base), "--tag", recipe.tag, *config)
            return
        layer = self.directory / f"layer-{recipe.tag}.tar"
        layer.write_bytes(self._layer(recipe))
        self._umoci("raw", "add-layer", "--image", self._image(recipe.base), "--tag", recipe.tag, str(layer))
        layer.unlink()
        self._umoci("config", "--image", self._image(recipe.tag), *config)

    def _layer(self, recipe: Recipe) -> bytes:
        """The recipe's additions as one tar layer (no unpack and repack of the base needed):
        parent directories, overlays, directories, helpers and marker files, in that order."""
        entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

        def add(path: str, mode: int, data: bytes | None = None, owner: int = 0) -> None:
            name = path.strip("/")
            parent = name.rpartition("/")[0]
            if parent and parent not in entries:
                add(parent, 0o755)
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, owner, owner, LAYER_MTIME
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            entries[name] = (info, data)

        for overlay in recipe.overlays:
            for source in sorted((FILES / overlay).rglob("*")):
                path = str(source.relative_to(FILES / overlay))
                mode = stat.S_IMODE(source.stat().st_mode)
                add(path, mode, None if source.is_dir() else source.read_bytes())
        for path, mode, owner in recipe.dirs:
            add(path, mode, owner=owner)
        for name, path, mode in recipe.programs:
            add(path, mode, (self.bin / name).read_bytes())
        for path, content in recipe.files:
            add(path, 0o644, content.encode())
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in entries.values():
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buffer.getvalue()

    # -- cache keys --------------------------------------------------------------------------

    def _key(self, recipe: Recipe, programs: dict[str, str]) -> str:
        # this file's own digest: a change to how images are made rebuilds them all (a few seconds)
        parts = [_file_digest(Path(__file__)), json.dumps(asdict(recipe), sort_keys=True), f"base {self.keys[recipe.base]}"]
        if recipe.tag == "busybox":
            parts.append(self._busybox_inputs())
        parts += [f"overlay {o} {_tree_digest(FILES / o)}" for o in recipe.overlays]
        parts += [f"program {name} {programs[name]}" for name, _, _ in recipe.programs]
        key = _digest("\n".join(parts))
        self.keys[recipe.tag] = key
        return key

    def _has_tag(self, tag: str) -> bool:
        try:
            self._index_entry(tag)
        except KeyError:
            return False
        return True

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")

    # -- pushing -----------------------------------------------------------------------------

    def push(self, registry: str, original: str) -> Pushed:
        """skopeo copy of the stand-in for `original` to `<registry>/<original>`."""
        name, tag = split_reference(mirror_reference(registry, original))
        target = _Registry(registry)
        started = time.monotonic()
        image = self._push(self._describe(IMAGES[original]), name.removeprefix(f"{registry}/"), tag, "oci", target)
        return Pushed(original, image.reference, image.digest, time.monotonic() - started)


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One builder per cache at a time (the layout's index.json is rewritten in place)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(cache: Path = DEFAULT_CACHE, log: Callable[[str], None] = print) -> StandInBuilder:
    """Build (or find cached) every stand-in in `cache`'s OCI layout."""
    with _locked(Path(cache)):
        builder = StandInBuilder(Path(cache), log)
        builder.build_all()
    return builder


def push_all(
    builder: StandInBuilder,
    registry: str,
    references: Iterable[str] = IMAGES,
    jobs: int = 4,
    log: Callable[[str], None] = print,
) -> list[Pushed]:
    """Push each reference's stand-in to `registry`, `jobs` skopeo copies at a time.

    docker-registry's filesystem storage writes a repository's blob links in place, so two
    pushes into one repository at once can read a half-written link (HEAD answers 500 "invalid
    checksum digest format"): the tags of one repository go one after the other. The first
    reference goes alone, so the shared busybox layer is uploaded once before the others."""
    references = list(references)
    by_repository: dict[str, list[str]] = {}
    for ref in references[1:]:
        by_repository.setdefault(split_reference(ref)[0], []).append(ref)
    pushed: dict[str, Pushed] = {}

    def push_in_turn(refs: list[str]) -> None:
        for ref in refs:
            result = builder.push(registry, ref)
            pushed[ref] = result
            built = builder.built[IMAGES[ref]]
            made = "cached" if built.cached else f"built {built.seconds:.2f}s"
            log(f"push   {ref:<68} {IMAGES[ref]:<24} {_size(built.size):>9}  {made:<13} pushed {result.seconds:5.2f}s")

    push_in_turn(references[:1])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(push_in_turn, refs) for refs in by_repository.values()]):
            future.result()
    return [pushed[ref] for ref in references]


def build_and_push(
    registry: str, cache: Path = DEFAULT_CACHE, jobs: int = 4, log: Callable[[str], None] = print
) -> list[str]:
    """Build every stand-in (cached) and push it to `registry` under its original name.

    Returns the original references pushed; the digest-pinned one (UNBUILDABLE) is skipped and said so.
    """
    started = time.monotonic()
    with _locked(Path(cache)):  # held while pushing too: a rebuild's gc would drop blobs under skopeo
        builder = StandInBuilder(Path(cache), log)
        builder.build_all()
        built_at = time.monotonic()
        pushed = push_all(builder, registry, IMAGES, jobs, log)
    done = time.monotonic()
    rebuilt = [b for b in builder.built.values() if not b.cached]
    blobs = {digest: size for tag in set(IMAGES.values()) for digest, size in builder.built[tag].layers}
    total = sum(blobs.values())
    log(
        f"stand-ins: {len(pushed)} references ({len(set(IMAGES.values()))} images, {_size(total)} in {len(blobs)} distinct layers, "
        f"{len(rebuilt)} rebuilt) pushed to {registry} in {done - started:.1f}s "
        f"(build {built_at - started:.1f}s, push {done - built_at:.1f}s)"
    )
    for ref, why in UNBUILDABLE.items():
        log(f"skipped {ref}: {why}")
    return [p.reference for p in pushed]


# -- file helpers ----------------------------------------------------------------------------


def _copy_overlay(source: Path, rootfs: Path) -> None:
    """Copy a files/ tree over the root filesystem, modes kept, owned by root."""
    for path in sorted(source.rglob("*")):
        target = rootfs / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()  # not write-through: it may be a hard link to something else
        shutil.copy2(path, target)
        os.chown(target, 0, 0)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(root: Path) -> str:
    """Names, modes and contents of every file under `root`."""
    lines = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            lines.append(f"{path.relative_to(root)} {path.stat().st_mode:o} {_file_digest(path)}")
    return _digest("\n".join(lines))


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", help="push to this registry (host:port, plain HTTP); without it: build only")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"build cache (default {DEFAULT_CACHE})")
    parser.add_argument("--jobs", type=int, default=4, help="parallel pushes (default 4)")
    args = parser.parse_args(argv)
    cache = args.cache if args.cache.is_absolute() else Path.cwd() / args.cache
    if args.registry:
        build_and_push(args.registry, cache, args.jobs)
    else:
        started = time.monotonic()
        builder = build(cache)
        print(f"stand-ins: {len(builder.built)} images in {builder.layout} ({time.monotonic() - started:.1f}s); "
              f"push them with --registry")
    return 0


if __name__ == "__main__":
    sys.exit(main())
