"""Fixtures of the kubelet suite: its test image and a real OTLP receiver per module."""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from tests.otlp_receiver import OTLPReceiver
from tests.registry_fixture import BuiltImage, ImageBuilder, _Layout

APPLETS = ("sh", "ls", "echo", "cat", "sleep", "id", "true", "false", "touch", "rm")
PASSWD = "root:x:0:0:root:/root:/bin/sh\ndefault-user:x:1000:1000::/home/default-user:/bin/sh\n"
GROUP = "root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"

def _build_tools_image(builder: ImageBuilder) -> _Layout:
    """busybox with `id` and friends, and an /etc/group making default-user (1000) a member of
    group-defined-in-image (50000): what SupplementalGroupsPolicy Merge adds and Strict leaves out."""
    base = builder._cached("busybox", builder._build_busybox)
    bundle = builder._unpack(base.tag, "kubelet-tools")
    root = bundle / "rootfs"
    for applet in APPLETS:
        if not os.path.lexists(root / "bin" / applet):
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    builder._repack("kubelet-tools", bundle)
    shutil.rmtree(bundle)
    return builder._describe("kubelet-tools")


@pytest.fixture(scope="module")
def image(image_builder: ImageBuilder) -> BuiltImage:
    built = image_builder._cached("kubelet-tools", lambda: _build_tools_image(image_builder))
    return image_builder._push(built, "kubelet/tools", "1", "oci", None)


@pytest.fixture(scope="module")
def traces() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver
