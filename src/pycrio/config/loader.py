"""Load the effective configuration: defaults < main file < drop-ins (lexical) < flags/env."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pycrio.config.schema import ROOT_TABLE, Config, default_of, is_table, map_of, table_of

if TYPE_CHECKING:
    from pycrio.images.registries_conf import RegistriesConf


class ConfigError(Exception):
    """A configuration problem, already phrased as one line naming file, key and problem."""


@dataclass(frozen=True)
class Override:
    """One value given on the command line or in the environment, e.g. ("tracing.enable_tracing", True)."""

    key: str
    value: Any
    source: str


@dataclass
class LoadedConfig:
    """The effective configuration, the files it came from, and warnings worth logging."""

    config: Config
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    explicit_keys: set[str] = field(default_factory=set)  # dotted keys below [pycrio] a file or flag set
    registries: RegistriesConf | None = None  # the registries.conf files [pycrio.image] names


def dropin_files(config_dir: Path) -> list[Path]:
    """The drop-in files of a directory in the order they apply; a missing directory has none."""
    if not config_dir.is_dir():
        return []
    return sorted((p for p in config_dir.iterdir() if p.suffix == ".conf" and p.is_file()), key=lambda p: p.name)


def load_config(
    config_file: Path,
    config_dir: Path,
    overrides: list[Override] | None = None,
    require_file: bool = False,
) -> LoadedConfig:
    """Build the effective configuration; raise ConfigError on the first invalid input."""
    loaded = LoadedConfig(config=Config())
    files = [config_file] if (require_file or config_file.exists()) else []
    for path in files + dropin_files(config_dir):
        _apply_file(loaded, path)
    loaded.overrides = list(overrides or [])
    for override in overrides or []:
        _set_value(loaded.config, override.key.split("."), override.value, override.source, f"{ROOT_TABLE}.{override.key}")
        loaded.explicit_keys.add(override.key)
    _check_consistency(loaded)
    # Imported here: pycrio.images imports this package.
    from pycrio.images.registries_conf import load_for

    loaded.registries = load_for(loaded)
    return loaded


def _check_consistency(loaded: LoadedConfig) -> None:
    """Checks that span several keys, reported against the last file that was read."""
    runtime = loaded.config.runtime
    if runtime.default_runtime not in runtime.runtimes:
        where = loaded.files[-1] if loaded.files else "configuration"
        known = ", ".join(sorted(runtime.runtimes))
        raise ConfigError(
            f"{where}: {ROOT_TABLE}.runtime.default_runtime: {runtime.default_runtime!r} is not a configured "
            f"runtime ({known})"
        )
    api = loaded.config.api
    if bool(api.stream_tls_cert) != bool(api.stream_tls_key):
        where = loaded.files[-1] if loaded.files else "configuration"
        given, missing = ("stream_tls_cert", "stream_tls_key") if api.stream_tls_cert else ("stream_tls_key", "stream_tls_cert")
        raise ConfigError(f"{where}: {ROOT_TABLE}.api.{missing}: must be set too when {given} is set")
    if api.stream_tls_ca and not api.stream_tls_cert:
        where = loaded.files[-1] if loaded.files else "configuration"
        raise ConfigError(f"{where}: {ROOT_TABLE}.api.stream_tls_ca: client certificates need stream_tls_cert and stream_tls_key")


def _apply_file(loaded: LoadedConfig, path: Path) -> None:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    loaded.files.append(path)
    for key, value in data.items():
        if key != ROOT_TABLE:
            loaded.warnings.append(f"{path}: unknown key {key!r} ignored")
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {ROOT_TABLE}: must be a table")
        _merge_table(loaded, loaded.config, value, ROOT_TABLE, path)


def _merge_table(loaded: LoadedConfig, target: Any, table: dict[str, Any], prefix: str, path: Path) -> None:
    """Override the fields of `target` named in `table`, leaving the others as they are."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        f = fields.get(key)
        if f is None:
            loaded.warnings.append(f"{path}: unknown key {dotted!r} ignored")
        elif is_table(f):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {dotted}: must be a table")
            _merge_table(loaded, getattr(target, key), value, dotted, path)
        elif (item_type := table_of(f)) is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {dotted}: must be a table")
            named = getattr(target, key)
            for name, item in value.items():
                if not isinstance(item, dict):
                    raise ConfigError(f"{path}: {dotted}.{name}: must be a table")
                _merge_table(loaded, named.setdefault(name, item_type()), item, f"{dotted}.{name}", path)
        elif (value_type := map_of(f)) is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {dotted}: must be a table")
            _merge_map(getattr(target, key), f, value_type, value, str(path), dotted)
        else:
            _set_value(target, [key], value, str(path), dotted)
            loaded.explicit_keys.add(dotted.removeprefix(f"{ROOT_TABLE}."))


def _merge_map(
    target: dict[str, Any], f: dataclasses.Field[Any], value_type: type, table: dict[str, Any], source: str, dotted: str
) -> None:
    """Add or replace the entries of a table of plain values (later files win per key)."""
    check, check_key = f.metadata.get("check"), f.metadata.get("check_key")
    for name, item in table.items():
        where = f"{dotted}.{name}"
        if check_key and (problem := check_key(name)):
            raise ConfigError(f"{source}: {where}: {problem}")
        # bool is an int in Python, but `Version = true` is not a number in TOML.
        if type(item) is not value_type:
            raise ConfigError(f"{source}: {where}: must be {_type_name(value_type)}, got {_type_name(type(item))} {item!r}")
        if check and (problem := check(item)):
            raise ConfigError(f"{source}: {where}: {problem}")
        target[name] = item


def _set_value(target: Any, keys: list[str], value: Any, source: str, dotted: str) -> None:
    for key in keys[:-1]:
        target = getattr(target, key)
    f = {f.name: f for f in dataclasses.fields(target)}[keys[-1]]
    expected = type(default_of(f))
    # bool is an int in Python, but `rate = true` is not a number in TOML.
    if type(value) is not expected:
        raise ConfigError(f"{source}: {dotted}: must be {_type_name(expected)}, got {_type_name(type(value))} {value!r}")
    if expected is list:
        bad = [item for item in value if type(item) is not str]
        if bad:
            raise ConfigError(f"{source}: {dotted}: must be an array of strings, got {_type_name(type(bad[0]))} {bad[0]!r}")
        value = list(value)
    check = f.metadata.get("check")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{source}: {dotted}: {problem}")
    setattr(target, keys[-1], value)


def _type_name(t: type) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", float: "a float", dict: "a table", list: "an array"}.get(
        t, t.__name__
    )
