"""Image references: parsing and normalization with Docker's rules (distribution's grammar)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pycrio.errors import InvalidArgument

DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_NAME_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_SHA256_HEX_RE = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class ImageReference:
    """A fully qualified image reference: registry, repository, and a tag and/or a digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`registry/repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str, default_tag: str | None = DEFAULT_TAG) -> ImageReference:
    """Parse `text`, normalizing the Docker way.

    A short name (no registry component) means docker.io, and a single-component docker.io
    name gets `library/`: `busybox` -> `docker.io/library/busybox:latest`. Use
    `resolve_candidates` to apply search registries to short names instead.
    `default_tag` is added when the reference has neither tag nor digest (None: add nothing).
    """
    registry, remainder = _split_registry(text)
    return _build(text, registry or DOCKER_HUB, remainder, default_tag)


def resolve_candidates(
    text: str, search_registries: list[str], default_tag: str | None = DEFAULT_TAG
) -> list[ImageReference]:
    """The references to try for `text`: itself when qualified, else one per search registry."""
    registry, remainder = _split_registry(text)
    if registry is not None:
        return [_build(text, registry, remainder, default_tag)]
    if not search_registries:
        raise InvalidArgument(
            f"image {text!r} is a short name (no registry) and no search registries are configured"
        )
    candidates: list[ImageReference] = []
    for search in search_registries:
        _check_registry(search, search)
        candidate = _build(text, search, remainder, default_tag)
        if candidate not in candidates:
            candidates.append(candidate)
    return candidates


def reference_at(text: str) -> ImageReference:
    """Parse `text` whose first component is always the registry (a name rewritten by
    registries.conf), even a host without '.' or ':' like `mirror/busybox:1`; no default tag."""
    registry, sep, remainder = text.partition("/")
    if not sep:
        raise InvalidArgument(f"invalid image reference {text!r}: no repository after the registry")
    return _build(text, registry, remainder, None)


def is_qualified(text: str) -> bool:
    """True when the first component of `text` names a registry."""
    return _split_registry(text)[0] is not None


def _split_registry(text: str) -> tuple[str | None, str]:
    """(registry or None, the rest): the first component is a registry when it looks like a host."""
    if not text:
        raise InvalidArgument("invalid image reference '': empty")
    if text != text.strip():
        raise InvalidArgument(f"invalid image reference {text!r}: surrounding whitespace")
    if _SHA256_HEX_RE.fullmatch(text):
        raise InvalidArgument(
            f"invalid image reference {text!r}: a 64-character hex string is an image id, "
            "not a repository name"
        )
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, text


def _build(text: str, registry: str, remainder: str, default_tag: str | None) -> ImageReference:
    """Validate the pieces of `remainder` (`repo[:tag][@digest]`) and assemble the reference."""
    _check_registry(text, registry)
    registry = DOCKER_HUB if registry.lower() in _DOCKER_HUB_ALIASES else registry
    name, _, digest = remainder.partition("@")
    if "@" in remainder and not digest:
        raise InvalidArgument(f"invalid image reference {text!r}: empty digest after '@'")
    repository, tag = _split_tag(name)
    if not repository:
        raise InvalidArgument(f"invalid image reference {text!r}: empty repository name")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    _check_repository(text, registry, repository)
    if tag is not None and not _TAG_RE.fullmatch(tag):
        raise InvalidArgument(
            f"invalid image reference {text!r}: tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        )
    if digest:
        _check_digest(text, digest)
    if tag is None and not digest:
        tag = default_tag
    return ImageReference(registry, repository, tag, digest or None)


def _split_tag(name: str) -> tuple[str, str | None]:
    """`repo:tag` -> (repo, tag); a ':' before the last '/' is not a tag separator."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, None


def _check_registry(text: str, registry: str) -> None:
    if not _DOMAIN_RE.fullmatch(registry):
        raise InvalidArgument(f"invalid image reference {text!r}: bad registry host {registry!r}")


def _check_repository(text: str, registry: str, repository: str) -> None:
    for component in repository.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise InvalidArgument(
                f"invalid image reference {text!r}: repository component {component!r} must be "
                "lowercase letters and digits, separated by '.', '_', '__' or '-'"
            )
    if len(registry) + 1 + len(repository) > _NAME_MAX:
        raise InvalidArgument(f"invalid image reference {text!r}: name longer than {_NAME_MAX} characters")


def _check_digest(text: str, digest: str) -> None:
    match = _DIGEST_RE.fullmatch(digest)
    if not match:
        raise InvalidArgument(f"invalid image reference {text!r}: malformed digest {digest!r}")
    algorithm, encoded = match.groups()
    if algorithm != "sha256":
        raise InvalidArgument(
            f"invalid image reference {text!r}: digest algorithm {algorithm!r} is not supported (only sha256)"
        )
    if not _SHA256_HEX_RE.fullmatch(encoded):
        raise InvalidArgument(
            f"invalid image reference {text!r}: a sha256 digest needs 64 lowercase hex characters"
        )
