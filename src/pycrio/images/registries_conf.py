"""containers-registries.conf(5) version 2: mirrors, rewritten locations, blocked and insecure
registries and the short-name search list, in the files CRI-O and podman users already have.

The main file (`[pycrio.image] registries_conf`, missing is fine) is read first, then the `*.conf`
files of `registries_conf_dir` in lexical order (containers-registries.conf.d(5)): a `[[registry]]`
with the prefix of an earlier one replaces it whole, others are added, and a drop-in that sets
`unqualified-search-registries` replaces the list. A name is looked up with the rules of
containers/image: the `[[registry]]` with the longest matching `prefix` wins (`*.example.com`
matches any subdomain); its mirrors are tried in order, then its `location`.

This module only reads files and rewrites names (plain strings): the configuration loader uses it
too, and must stay cheap to import.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pycrio.config.loader import ConfigError, dropin_files

if TYPE_CHECKING:
    from pycrio.config import LoadedConfig

MIRROR_ALL = "all"
MIRROR_DIGEST_ONLY = "digest-only"
MIRROR_TAG_ONLY = "tag-only"
PULL_FROM_MIRROR = (MIRROR_ALL, MIRROR_DIGEST_ONLY, MIRROR_TAG_ONLY)
SHORT_NAME_MODES = ("disabled", "enforcing", "permissive")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_RE = re.compile(_HOST)
_NAMESPACE_RE = re.compile(rf"{_HOST}(?:/{_PATH_COMPONENT})*")
_WILDCARD_RE = re.compile(rf"\*\.{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*")

# Keys we read; those we accept and ignore (logged at debug when the daemon applies the files).
_TOP_KEYS = {"registry", "unqualified-search-registries", "short-name-mode"}
_IGNORED_TOP_KEYS = {"aliases", "credential-helpers", "additional-layer-store-auth-helper"}
_REGISTRY_KEYS = {"prefix", "location", "insecure", "blocked", "mirror", "mirror-by-digest-only"}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}


@dataclass(frozen=True)
class Mirror:
    """One `[[registry.mirror]]`: a (possibly partial) copy of the prefix's namespace."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = MIRROR_ALL


@dataclass(frozen=True)
class Registry:
    """One `[[registry]]` after defaults: prefix set, locations without a trailing slash."""

    prefix: str
    location: str  # empty only for a wildcard prefix: names are then used as they are
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()
    mirror_by_digest_only: bool = False
    source: str = ""  # the file that defined it

    def match_length(self, name: str) -> int:
        """How much of `name` (`host[:port]/repository`) this prefix covers, or -1."""
        if self.prefix.startswith("*."):
            host = name.partition("/")[0]
            bare = host if host.startswith("[") else host.partition(":")[0]
            suffix = self.prefix[1:]
            return len(host) if bare.endswith(suffix) and len(bare) > len(suffix) else -1
        if name == self.prefix:
            return len(name)
        # Unlike containers/image, `example.com` does not cover `example.com:5000/...`: another host.
        if name.startswith(self.prefix) and name[len(self.prefix)] == "/":
            return len(self.prefix)
        return -1


@dataclass(frozen=True)
class PullSource:
    """One place to try for an image: the reference as it is named there, and how to reach it."""

    reference: str  # `host[:port]/repository[:tag][@digest]`, to be parsed by the puller
    insecure: bool  # plain HTTP
    mirror: bool

    @property
    def host(self) -> str:
        return self.reference.partition("/")[0]


@dataclass(frozen=True)
class RegistriesConf:
    """The merged registries.conf files: what a pull consults."""

    registries: tuple[Registry, ...] = ()
    search_registries: tuple[str, ...] | None = None  # unqualified-search-registries; None: no file sets it
    search_origin: str = ""
    # The search list replaces pycrio's unqualified_search_registries (set by the loader: pycrio's
    # own key was not set in a pycrio file or flag, and this list is not empty).
    use_search: bool = False
    files: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default=(), compare=False)  # "file: key" read and not applied
    unknown: tuple[str, ...] = field(default=(), compare=False)  # warnings: "file: unknown key 'k' ignored"

    def find(self, name: str) -> Registry | None:
        """The `[[registry]]` whose prefix matches `name` longest (the first of equals), or None."""
        best: Registry | None = None
        best_length = 0
        for registry in self.registries:
            if registry.match_length(name) != -1 and len(registry.prefix) > best_length:
                best, best_length = registry, len(registry.prefix)
        return best

    def search_list(self, pycrio_search: list[str]) -> list[str]:
        """The registries short names are tried against."""
        return list(self.search_registries or ()) if self.use_search else list(pycrio_search)

    def pull_sources(
        self, name: str, suffix: str, digested: bool, insecure_registries: frozenset[str] | set[str] = frozenset()
    ) -> list[PullSource]:
        """Where to look for `name` + `suffix` (`:tag`, `@digest`), in order: mirrors, then the location.

        A blocked registry is the caller's to refuse (see `find`); a source whose own host is
        blocked is left out. `insecure_registries` are pycrio's plain-HTTP hosts.
        """
        registry = self.find(name)
        if registry is None:
            return [PullSource(name + suffix, name.partition("/")[0] in insecure_registries, False)]
        length = registry.match_length(name)
        rest = name[length:] + suffix
        sources: list[PullSource] = []
        for mirror in registry.mirrors:
            if registry.mirror_by_digest_only and not digested:
                continue
            if mirror.pull_from_mirror == MIRROR_DIGEST_ONLY and not digested:
                continue
            if mirror.pull_from_mirror == MIRROR_TAG_ONLY and digested:
                continue
            sources.append(self._source(mirror.location + rest, mirror.insecure, True, insecure_registries))
        primary = registry.location + rest if registry.location else name + suffix
        sources.append(self._source(primary, registry.insecure, False, insecure_registries))
        return [s for s in sources if not self._blocked(s)]

    def _source(self, reference: str, insecure: bool, mirror: bool, insecure_registries: frozenset[str] | set[str]) -> PullSource:
        host = reference.partition("/")[0]
        # As containers/image does, the [[registry]] that covers the endpoint itself counts too.
        own = self.find(_name_of(reference))
        return PullSource(reference, insecure or host in insecure_registries or bool(own and own.insecure), mirror)

    def _blocked(self, source: PullSource) -> bool:
        own = self.find(_name_of(source.reference))
        return bool(own and own.blocked)

    def describe(self) -> str:
        """One line for the log: the prefixes and their mirrors."""
        if not self.registries:
            return "no [[registry]] entries"
        parts = []
        for r in self.registries:
            text = r.prefix if not r.location or r.location == r.prefix else f"{r.prefix} -> {r.location}"
            if r.blocked:
                text += " (blocked)"
            if r.mirrors:
                text += " mirrors " + ", ".join(m.location for m in r.mirrors)
            parts.append(text)
        return "; ".join(parts)


def _name_of(reference: str) -> str:
    """`host/repo` of `host/repo[:tag][@digest]`."""
    name = reference.partition("@")[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name


# -- loading ---------------------------------------------------------------------------------


def load_registries_conf(main: Path | None, dropin_dir: Path | None) -> RegistriesConf:
    """Parse and merge the main file (missing is fine) and the drop-ins; ConfigError naming file
    and key on the first problem. None (an empty path in the configuration) reads nothing."""
    merged: dict[str, Registry] = {}
    search: tuple[str, ...] | None = None
    search_origin = ""
    files: list[str] = []
    ignored: list[str] = []
    unknown: list[str] = []
    paths: list[tuple[Path, bool]] = []
    if main is not None and main.exists():
        paths.append((main, False))
    if dropin_dir is not None:
        try:
            paths += [(p, True) for p in dropin_files(dropin_dir)]
        except OSError as exc:
            raise ConfigError(f"{dropin_dir}: cannot read: {exc.strerror}") from None
    for path, dropin in paths:
        parsed = _parse_file(path, dropin)
        files.append(str(path))
        ignored += [f"{path}: {key}" for key in parsed.ignored]
        unknown += [f"{path}: unknown key {key!r} ignored" for key in parsed.unknown]
        for registry in parsed.registries:
            merged[registry.prefix] = registry  # a drop-in replaces a whole entry of the same prefix
        if parsed.search_registries is not None:
            search, search_origin = parsed.search_registries, str(path)
    return RegistriesConf(
        registries=tuple(merged[prefix] for prefix in sorted(merged)),
        search_registries=search,
        search_origin=search_origin,
        files=tuple(files),
        ignored=tuple(ignored),
        unknown=tuple(unknown),
    )


def load_for(loaded: LoadedConfig) -> RegistriesConf:
    """The registries files a loaded pycrio configuration names, with its search-list decision:
    pycrio's `unqualified_search_registries` wins when a pycrio file or flag sets it, else the
    registries.conf list when it is not empty, else pycrio's default."""
    image = loaded.config.image
    conf = load_registries_conf(
        Path(image.registries_conf) if image.registries_conf else None,
        Path(image.registries_conf_dir) if image.registries_conf_dir else None,
    )
    loaded.warnings += conf.unknown
    explicit = "image.unqualified_search_registries" in loaded.explicit_keys
    if conf.search_registries and not explicit:
        conf = dataclasses.replace(conf, use_search=True)
    return conf


@dataclass
class _ParsedFile:
    registries: list[Registry] = field(default_factory=list)
    search_registries: tuple[str, ...] | None = None
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


class _Checker:
    """Typed reads of one file's TOML values; every problem is `<file>: <key>: <problem>`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")

    def boolean(self, table: dict[str, Any], key: str, where: str) -> bool:
        value = table.get(key, False)
        if type(value) is not bool:
            raise self.fail(f"{where}{key}", f"must be a boolean, got {value!r}")
        return value

    def string(self, table: dict[str, Any], key: str, where: str) -> str:
        value = table.get(key, "")
        if not isinstance(value, str):
            raise self.fail(f"{where}{key}", f"must be a string, got {value!r}")
        return value

    def strings(self, table: dict[str, Any], key: str) -> list[str]:
        value = table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be an array of strings, got {value!r}")
        return value

    def location(self, value: str, key: str, wildcard_ok: bool = False) -> str:
        """A `host[:port][/namespace]` without scheme; trailing slashes dropped."""
        trimmed = value.rstrip("/")
        if trimmed.startswith(("http://", "https://")):
            raise self.fail(key, f"must not have a URI scheme (write host[:port][/path]), got {value!r}")
        if wildcard_ok and trimmed.startswith("*"):
            if not _WILDCARD_RE.fullmatch(trimmed):
                raise self.fail(
                    key, f"a wildcard prefix must be *.example.com (no port, path, '@' or ':'), got {value!r}"
                )
            return trimmed
        if not _NAMESPACE_RE.fullmatch(trimmed):
            raise self.fail(
                key,
                "must be host[:port] optionally followed by /path (lowercase path components, "
                f"like 127.0.0.1:5000/registry.k8s.io), got {value!r}",
            )
        return trimmed


def _parse_file(path: Path, dropin: bool) -> _ParsedFile:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    check = _Checker(path)
    parsed = _ParsedFile()
    if "registries" in data:
        # Version 1 ([registries.search] / .insecure / .block): only in the main file, not mixed.
        if dropin:
            raise check.fail("registries", "version 1 format is not accepted in a drop-in; use [[registry]]")
        if set(data) & (_TOP_KEYS | {"aliases"}):
            raise check.fail("registries", "mixing version 1 ([registries.*]) and version 2 keys is not supported")
        return _convert_v1(check, data["registries"])
    for key in data:
        if key in _IGNORED_TOP_KEYS:
            parsed.ignored.append(key)
        elif key not in _TOP_KEYS:
            parsed.unknown.append(key)
    if "unqualified-search-registries" in data:
        key = "unqualified-search-registries"
        hosts = []
        for item in check.strings(data, key):
            host = item.rstrip("/")
            if not _HOST_RE.fullmatch(host):
                raise check.fail(key, f"must list registry hosts (host[:port]), got {item!r}")
            hosts.append(host)
        parsed.search_registries = tuple(hosts)
    if "short-name-mode" in data:
        mode = data["short-name-mode"]
        if mode not in SHORT_NAME_MODES:
            raise check.fail("short-name-mode", f"must be one of {', '.join(SHORT_NAME_MODES)}, got {mode!r}")
        parsed.ignored.append("short-name-mode (pycrio never prompts: short names try each search registry)")
    entries = data.get("registry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise check.fail("registry", "must be an array of tables ([[registry]])")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        registry = _parse_registry(check, entry, f"registry[{index}].", parsed)
        if registry.prefix not in seen:  # the first of the same prefix wins within a file
            seen.add(registry.prefix)
            parsed.registries.append(registry)
    _check_conflicts(check, parsed.registries)
    return parsed


def _parse_registry(check: _Checker, entry: dict[str, Any], where: str, parsed: _ParsedFile) -> Registry:
    for key in entry:
        if key == "pull-from-mirror":
            raise check.fail(f"{where}{key}", "only a [[registry.mirror]] can set it, not the registry itself")
        if key not in _REGISTRY_KEYS:
            parsed.unknown.append(f"{where}{key}")
    location = check.string(entry, "location", where)
    location = check.location(location, f"{where}location") if location else ""
    prefix = check.string(entry, "prefix", where)
    if prefix:
        prefix = check.location(prefix, f"{where}prefix", wildcard_ok=True)
    elif location:
        prefix = location
    else:
        raise check.fail(f"{where}location", "must be set (only a *.example.com prefix may go without one)")
    if not location and not prefix.startswith("*."):
        raise check.fail(f"{where}location", f"must be set for prefix {prefix!r} (only *.example.com prefixes may go without one)")
    by_digest = check.boolean(entry, "mirror-by-digest-only", where)
    mirrors_raw = entry.get("mirror", [])
    if not isinstance(mirrors_raw, list) or not all(isinstance(m, dict) for m in mirrors_raw):
        raise check.fail(f"{where}mirror", "must be an array of tables ([[registry.mirror]])")
    mirrors = []
    for index, raw in enumerate(mirrors_raw):
        at = f"{where}mirror[{index}]."
        for key in raw:
            if key not in _MIRROR_KEYS:
                parsed.unknown.append(f"{at}{key}")
        mirror_location = check.string(raw, "location", at)
        if not mirror_location:
            raise check.fail(f"{at}location", "must be set")
        mode = check.string(raw, "pull-from-mirror", at) or MIRROR_ALL
        if mode not in PULL_FROM_MIRROR:
            raise check.fail(f"{at}pull-from-mirror", f"must be one of {', '.join(PULL_FROM_MIRROR)}, got {mode!r}")
        if by_digest and "pull-from-mirror" in raw:
            raise check.fail(f"{at}pull-from-mirror", "cannot be set when the registry sets mirror-by-digest-only")
        mirrors.append(Mirror(check.location(mirror_location, f"{at}location"), check.boolean(raw, "insecure", at), mode))
    return Registry(
        prefix=prefix,
        location=location,
        insecure=check.boolean(entry, "insecure", where),
        blocked=check.boolean(entry, "blocked", where),
        mirrors=tuple(mirrors),
        mirror_by_digest_only=by_digest,
        source=str(check.path),
    )


def _check_conflicts(check: _Checker, registries: list[Registry]) -> None:
    """One location (or wildcard) listed twice must agree on insecure and blocked."""
    first: dict[str, tuple[int, Registry]] = {}
    for index, registry in enumerate(registries):
        key = registry.location or registry.prefix
        if key not in first:
            first[key] = (index, registry)
            continue
        _, other = first[key]
        for attr in ("insecure", "blocked"):
            if getattr(registry, attr) != getattr(other, attr):
                raise check.fail(
                    f"registry[{index}].{attr}",
                    f"registry {key!r} is defined more than once with conflicting {attr!r} settings",
                )


def _convert_v1(check: _Checker, table: Any) -> _ParsedFile:
    """[registries.search] registries = [...], [registries.insecure], [registries.block]."""
    if not isinstance(table, dict):
        raise check.fail("registries", "must be a table")
    parsed = _ParsedFile()
    lists: dict[str, list[str]] = {}
    for kind in ("search", "insecure", "block"):
        sub = table.get(kind, {})
        if not isinstance(sub, dict):
            raise check.fail(f"registries.{kind}", "must be a table")
        value = sub.get("registries", [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise check.fail(f"registries.{kind}.registries", f"must be an array of strings, got {value!r}")
        lists[kind] = [check.location(v, f"registries.{kind}.registries") for v in value]
    for key in table:
        if key not in lists:
            parsed.unknown.append(f"registries.{key}")
    if lists["search"]:
        parsed.search_registries = tuple(lists["search"])
    locations = list(dict.fromkeys(lists["block"] + lists["insecure"]))
    for location in locations:
        parsed.registries.append(
            Registry(
                prefix=location,
                location=location,
                insecure=location in lists["insecure"],
                blocked=location in lists["block"],
                source=str(check.path),
            )
        )
    return parsed
