"""Layer unpacking (overlay-format layer dirs) and container rootfs (overlay mount or copy), for real.

Needs root: layers carry devices, foreign owners, setuid files and trusted.* xattrs, and rootfs
mounts overlayfs. Every test leaves no mount behind (checked in /proc/self/mountinfo).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import Iterator

import pytest
import zstandard

from pycrio.errors import FailedPrecondition, InvalidArgument
from pycrio.images.rootfs import _probe_overlay, mount_rootfs, overlay_supported, release_rootfs
from pycrio.images.unpack import CorruptLayerError, LayerStats, UnsafeLayerError, unpack_layer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking image layers needs root")

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_600_000_000
# A v2 file capability: cap_net_raw, effective. chown clears it, so it survives only if set after chown.
NET_RAW_CAP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
NOT_UTF8 = b"\xff\xfe\x00binary"
Member = tuple[tarfile.TarInfo, bytes | None]


# --- building layers -------------------------------------------------------------------------------


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    return info


def reg(
    name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, xattrs: dict[str, str] | None = None
) -> Member:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    return info, data


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, uid, gid), None


def symlink(name: str, target: str) -> Member:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, None


def hardlink(name: str, target: str) -> Member:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, None


def fifo(name: str) -> Member:
    return _info(name, tarfile.FIFOTYPE, 0o620), None


def chardev(name: str, major: int, minor: int) -> Member:
    info = _info(name, tarfile.CHRTYPE, 0o666)
    info.devmajor, info.devminor = major, minor
    return info, None


def tar_bytes(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    return {"tar": lambda d: d, "gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[kind](data)


BASE = [
    directory("./"),
    directory("etc/"),
    reg("etc/config", b"base config\n", mode=0o640, uid=1234, gid=5678),
    directory("bin/"),
    reg("bin/su", b"#!setuid\n", mode=0o4755),
    directory("tmp/", mode=0o1777),
    directory("data/", uid=1234),
    reg("data/old1", b"old 1\n"),
    directory("data/sub/"),
    reg("data/sub/old2", b"old 2\n"),
    reg("gone.txt", b"to be deleted\n"),
    symlink("link", "etc/config"),
    hardlink("hard", "etc/config"),
    fifo("fifo"),
    chardev("null", 1, 3),
    reg("tagged", b"has xattrs\n", xattrs={"user.foo": "bar", "user.bin": NOT_UTF8.decode("utf-8", "surrogateescape")}),
    reg("bin/ping", b"ping\n", mode=0o755, uid=1234, xattrs={"security.capability": NET_RAW_CAP.decode()}),
]
UPPER = [
    reg(".wh.gone.txt", b""),
    directory("data/", uid=1234),
    reg("data/.wh..wh..opq", b""),
    reg("data/new", b"new data\n"),
    directory("etc/"),
    reg("etc/extra", b"extra\n", mode=0o600),
]


@pytest.fixture(autouse=True)
def no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a mount under its tmp_path (and clean it up so later runs are not hurt)."""
    yield
    leftovers = mounts_under(tmp_path)
    for mountpoint in sorted(leftovers, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)
    assert not leftovers, f"mounts left behind: {leftovers}"


def mounts_under(directory: Path) -> list[str]:
    prefix = os.path.realpath(directory)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def write_blob(tmp_path: Path, name: str, members: list[Member], kind: str = "tar") -> tuple[Path, bytes]:
    raw = tar_bytes(members)
    blob = tmp_path / "blobs" / name
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(compress(raw, kind))
    return blob, raw


def unpack(tmp_path: Path, name: str, members: list[Member], kind: str = "tar", media_type: str = OCI_TAR) -> Path:
    blob, _ = write_blob(tmp_path, name, members, kind)
    dest = tmp_path / "layers" / name
    dest.parent.mkdir(exist_ok=True)
    unpack_layer(blob, media_type, dest)
    return dest


# --- unpack_layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "media_type"), [("tar", OCI_TAR), ("gzip", OCI_GZIP), ("zstd", OCI_ZSTD), ("gzip", DOCKER_GZIP)]
)
def test_unpack_keeps_owners_modes_links_devices_xattrs(tmp_path: Path, kind: str, media_type: str) -> None:
    blob, raw = write_blob(tmp_path, "base", BASE, kind)
    dest = tmp_path / "layers" / "base"
    dest.parent.mkdir()

    stats = unpack_layer(blob, media_type, dest)

    assert stats == LayerStats(files=len(BASE), bytes=len(raw), diff_id="sha256:" + hashlib.sha256(raw).hexdigest())
    config = os.lstat(dest / "etc/config")
    assert (config.st_uid, config.st_gid, stat.S_IMODE(config.st_mode)) == (1234, 5678, 0o640)
    assert config.st_mtime == MTIME
    assert (dest / "etc/config").read_bytes() == b"base config\n"
    assert stat.S_IMODE(os.lstat(dest / "bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(dest / "tmp").st_mode) == 0o1777
    assert os.lstat(dest / "data").st_uid == 1234
    assert os.lstat(dest / "data").st_mtime == MTIME  # set after its children were created
    assert os.readlink(dest / "link") == "etc/config"
    assert os.lstat(dest / "hard").st_ino == config.st_ino
    assert config.st_nlink == 2
    assert stat.S_ISFIFO(os.lstat(dest / "fifo").st_mode)
    null = os.lstat(dest / "null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert os.getxattr(dest / "tagged", "user.foo") == b"bar"
    assert os.getxattr(dest / "tagged", "user.bin") == NOT_UTF8
    assert os.getxattr(dest / "bin/ping", "security.capability") == NET_RAW_CAP
    assert not list(tmp_path.glob("layers/.tmp-*"))


def test_whiteouts_and_opaque_dirs_become_overlay_format(tmp_path: Path) -> None:
    dest = unpack(tmp_path, "upper", UPPER, "zstd", OCI_ZSTD)

    whiteout = os.lstat(dest / "gone.txt")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "data", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(dest)) == ["data", "etc", "gone.txt"]
    assert sorted(os.listdir(dest / "data")) == ["new"]  # no marker file


def test_diff_id_is_the_uncompressed_tar_digest_whatever_the_compression(tmp_path: Path) -> None:
    raw = tar_bytes(BASE)
    ids = set()
    for kind, media_type in [("tar", OCI_TAR), ("gzip", OCI_GZIP), ("zstd", OCI_ZSTD)]:
        blob = tmp_path / f"blob-{kind}"
        blob.write_bytes(compress(raw, kind))
        ids.add(unpack_layer(blob, media_type, tmp_path / f"layer-{kind}").diff_id)
    assert ids == {"sha256:" + hashlib.sha256(raw).hexdigest()}


def test_trailing_data_after_the_tar_end_is_still_hashed(tmp_path: Path) -> None:
    raw = tar_bytes([reg("a", b"a")]) + b"\0" * 10240  # extra blocks of padding, as some builders write
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(raw))
    stats = unpack_layer(blob, OCI_GZIP, tmp_path / "layer")
    assert (stats.bytes, stats.diff_id) == (len(raw), "sha256:" + hashlib.sha256(raw).hexdigest())


def test_compression_is_sniffed_not_trusted(tmp_path: Path) -> None:
    raw = tar_bytes([reg("a", b"a")])
    plain, zstd = tmp_path / "plain", tmp_path / "zstd"
    plain.write_bytes(raw)
    zstd.write_bytes(compress(raw, "zstd"))
    assert unpack_layer(plain, OCI_GZIP, tmp_path / "l1").diff_id == unpack_layer(zstd, DOCKER_GZIP, tmp_path / "l2").diff_id
    assert (tmp_path / "l1" / "a").read_bytes() == (tmp_path / "l2" / "a").read_bytes() == b"a"


def test_absolute_member_names_are_rooted_at_the_layer(tmp_path: Path) -> None:
    dest = unpack(tmp_path, "abs", [reg("/etc/x", b"inside"), hardlink("/etc/y", "/etc/x")])
    assert (dest / "etc/x").read_bytes() == b"inside"
    assert os.lstat(dest / "etc/y").st_ino == os.lstat(dest / "etc/x").st_ino


def test_later_members_replace_earlier_ones(tmp_path: Path) -> None:
    members = [reg("a", b"first"), reg("a", b"second"), directory("d/"), reg("d/f", b"f"), symlink("d", "a")]
    dest = unpack(tmp_path, "dup", members)
    assert (dest / "a").read_bytes() == b"second"
    assert os.readlink(dest / "d") == "a"


def test_overlay_xattrs_in_the_tar_are_not_applied(tmp_path: Path) -> None:
    dest = unpack(tmp_path, "forged", [reg("f", b"", xattrs={"trusted.overlay.redirect": "/etc", "user.ok": "1"})])
    assert os.listxattr(dest / "f") == ["user.ok"]


ESCAPES = {
    "dotdot": [reg("../evil", b"x")],
    "dotdot_inside": [directory("a/"), reg("a/../../evil", b"x")],
    "absolute_dotdot": [reg("/../evil", b"x")],
    "through_symlink_to_root": [symlink("link", "/"), reg("link/tmp/pwned", b"x")],
    "through_symlink_upwards": [symlink("up", "../../.."), reg("up/evil", b"x")],
    "hardlink_dotdot": [hardlink("h", "../../outside")],
    "hardlink_through_symlink": [symlink("etc", "/etc"), hardlink("stolen", "etc/passwd")],
    "whiteout_of_dot": [directory("d/"), reg("d/.wh..", b"")],
}


@pytest.mark.parametrize("members", ESCAPES.values(), ids=ESCAPES.keys())
def test_escaping_members_are_rejected_and_nothing_is_left(tmp_path: Path, members: list[Member]) -> None:
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    blob, _ = write_blob(tmp_path, "bad", members, "gzip")
    layers = tmp_path / "deep" / "layers"
    layers.mkdir(parents=True)

    with pytest.raises(UnsafeLayerError) as caught:
        unpack_layer(blob, OCI_GZIP, layers / "bad")

    assert caught.value.code.name == "FAILED_PRECONDITION"
    assert os.listdir(layers) == []  # neither dest nor the temp dir
    assert sorted(os.listdir(tmp_path / "deep")) == ["layers"]
    assert outside.read_text() == "untouched"
    assert not (tmp_path / "evil").exists() and not Path("/tmp/pwned").exists()


def test_existing_dest_is_refused(tmp_path: Path) -> None:
    blob, _ = write_blob(tmp_path, "a", [reg("a", b"a")])
    (tmp_path / "layer").mkdir()
    with pytest.raises(FileExistsError):
        unpack_layer(blob, OCI_TAR, tmp_path / "layer")
    assert os.listdir(tmp_path / "layer") == []


@pytest.mark.parametrize(
    "content", [b"not a tar at all" * 100, gzip.compress(tar_bytes(BASE))[:200]], ids=["garbage", "truncated"]
)
def test_corrupt_blobs_are_data_loss(tmp_path: Path, content: bytes) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(content)
    (tmp_path / "layers").mkdir()
    with pytest.raises(CorruptLayerError) as caught:
        unpack_layer(blob, OCI_GZIP, tmp_path / "layers" / "x")
    assert caught.value.code.name == "DATA_LOSS"
    assert os.listdir(tmp_path / "layers") == []


def test_unknown_media_type_is_invalid(tmp_path: Path) -> None:
    blob, _ = write_blob(tmp_path, "a", [reg("a", b"a")])
    with pytest.raises(InvalidArgument):
        unpack_layer(blob, "application/vnd.oci.image.layer.v1.tar+encrypted", tmp_path / "layer")


# --- mount_rootfs / release_rootfs -----------------------------------------------------------------


@pytest.fixture
def image_layers(tmp_path: Path) -> list[Path]:
    return [unpack(tmp_path, "base", BASE, "gzip", OCI_GZIP), unpack(tmp_path, "upper", UPPER, "zstd", OCI_ZSTD)]


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    """Every path under `directory` with its mode, owner, mtime and content (to prove layers unchanged)."""
    out: dict[str, tuple[int, int, int, bytes | None]] = {}
    for path in [directory, *directory.rglob("*")]:
        st = os.lstat(path)
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(path.relative_to(directory))] = (st.st_mode, st.st_uid, st.st_mtime_ns, content)
    return out


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_rootfs_shows_the_merged_image(tmp_path: Path, image_layers: list[Path], mode: str) -> None:
    container = tmp_path / "containers" / "c1"
    layer_state = [snapshot(layer) for layer in image_layers]

    rootfs = mount_rootfs(image_layers, container, force_copy=mode == "copy")

    assert rootfs == container / "rootfs"
    assert (container / "rootfs.mode").read_text().strip() == mode
    assert (str(rootfs) in mounts_under(tmp_path)) == (mode == "overlay")
    assert not (rootfs / "gone.txt").exists()
    assert sorted(os.listdir(rootfs / "data")) == ["new"]
    assert (rootfs / "etc/config").read_bytes() == b"base config\n"
    assert (rootfs / "etc/extra").read_bytes() == b"extra\n"
    assert stat.S_IMODE(os.lstat(rootfs / "etc/extra").st_mode) == 0o600
    config = os.lstat(rootfs / "etc/config")
    assert (config.st_uid, config.st_gid, stat.S_IMODE(config.st_mode)) == (1234, 5678, 0o640)
    assert os.lstat(rootfs / "hard").st_ino == config.st_ino
    assert os.readlink(rootfs / "link") == "etc/config"
    assert stat.S_IMODE(os.lstat(rootfs / "bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(rootfs / "tmp").st_mode) == 0o1777
    assert stat.S_ISFIFO(os.lstat(rootfs / "fifo").st_mode)
    assert os.lstat(rootfs / "null").st_rdev == os.makedev(1, 3)
    assert os.getxattr(rootfs / "tagged", "user.foo") == b"bar"
    assert os.getxattr(rootfs / "tagged", "user.bin") == NOT_UTF8
    assert os.getxattr(rootfs / "bin/ping", "security.capability") == NET_RAW_CAP
    assert "trusted.overlay.opaque" not in os.listxattr(rootfs / "data")

    (rootfs / "etc/config").write_bytes(b"changed by the container\n")
    (rootfs / "etc/extra").unlink()
    (rootfs / "new-file").write_bytes(b"new")
    assert [snapshot(layer) for layer in image_layers] == layer_state
    if mode == "overlay":
        upper = container / "upper"
        assert (upper / "etc/config").read_bytes() == b"changed by the container\n"
        assert os.lstat(upper / "etc/extra").st_rdev == 0 and stat.S_ISCHR(os.lstat(upper / "etc/extra").st_mode)
        assert (upper / "new-file").exists()

    release_rootfs(container)
    assert not mounts_under(tmp_path)
    assert not container.exists()
    release_rootfs(container)  # idempotent


def test_single_layer_overlay(tmp_path: Path) -> None:
    layer = unpack(tmp_path, "only", BASE)
    rootfs = mount_rootfs([layer], tmp_path / "c")
    assert (tmp_path / "c" / "rootfs.mode").read_text().strip() == "overlay"
    assert (rootfs / "gone.txt").read_bytes() == b"to be deleted\n"
    release_rootfs(tmp_path / "c")
    assert not mounts_under(tmp_path)


@pytest.mark.parametrize(
    ("count", "name"), [(3, "sha256:{i:064x}"), (60, "layer-{i:03}-" + "x" * 90)], ids=["colons", "longer_than_a_page"]
)
def test_overlay_with_awkward_lowerdir_paths(tmp_path: Path, count: int, name: str) -> None:
    layers = []
    for i in range(count):
        layer = tmp_path / "layers" / name.format(i=i)
        layer.mkdir(parents=True)
        (layer / f"f{i}").write_text(str(i))
        (layer / "top").write_text(str(i))
        layers.append(layer)
    assert len(":".join(map(str, layers))) > 3500 or ":" in str(layers[0])

    rootfs = mount_rootfs(layers, tmp_path / "c")

    assert (tmp_path / "c" / "rootfs.mode").read_text().strip() == "overlay"
    assert (rootfs / "top").read_text() == str(count - 1)
    assert all((rootfs / f"f{i}").read_text() == str(i) for i in range(count))
    release_rootfs(tmp_path / "c")
    assert not mounts_under(tmp_path)


def test_copy_mode_takes_directory_metadata_from_the_top_layer(tmp_path: Path) -> None:
    base = unpack(tmp_path, "base", [directory("d/", mode=0o755), reg("d/f", b"")])
    top = unpack(tmp_path, "top", [directory("d/", mode=0o700, uid=42)])
    os.setxattr(base / "d", "user.lower", b"1")
    rootfs = mount_rootfs([base, top], tmp_path / "c", force_copy=True)
    d = os.lstat(rootfs / "d")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_mtime) == (0o700, 42, MTIME)
    assert os.listxattr(rootfs / "d") == []
    assert (rootfs / "d/f").exists()
    release_rootfs(tmp_path / "c")


def test_mount_rootfs_refuses_a_second_rootfs_and_missing_layers(tmp_path: Path, image_layers: list[Path]) -> None:
    container = tmp_path / "c"
    mount_rootfs(image_layers, container)
    with pytest.raises(FileExistsError):
        mount_rootfs(image_layers, container)
    release_rootfs(container)

    with pytest.raises(FailedPrecondition):
        mount_rootfs([tmp_path / "missing"], container)
    assert not container.exists()


def test_falls_back_to_copy_where_overlay_cannot_mount(tmp_path: Path, image_layers: list[Path]) -> None:
    outer = mount_rootfs(image_layers, tmp_path / "outer")
    nested = outer / "nested"  # overlayfs cannot be the upper file system of another overlay

    assert not overlay_supported(nested)
    rootfs = mount_rootfs(image_layers, nested)

    assert (nested / "rootfs.mode").read_text().strip() == "copy"
    assert sorted(os.listdir(rootfs / "data")) == ["new"] and not (rootfs / "gone.txt").exists()
    release_rootfs(nested)
    release_rootfs(tmp_path / "outer")
    assert not mounts_under(tmp_path)


def test_overlay_probe_answers_on_ext4_and_cleans_up(tmp_path: Path) -> None:
    assert overlay_supported(tmp_path)
    assert _probe_overlay(tmp_path)  # uncached: the cached answer may come from an earlier test
    assert os.listdir(tmp_path) == []
