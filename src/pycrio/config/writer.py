"""Render a configuration as commented TOML that pycrio loads back (like `crio config`)."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from pycrio.config.schema import ROOT_TABLE, Config, is_table, map_of, table_of

HEADER = """\
# pycrio configuration file.
#
# Written by `pycrio config`. Values equal to the built-in default are commented out;
# the others are what this daemon would run with. Precedence, lowest first:
#   built-in defaults < main file (--config) < drop-ins (--config-dir/*.conf, lexical order)
#   < command-line flags and PYCRIO_* environment variables.
"""


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, int, string or array of strings (JSON string escapes are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML rendering for {type(value).__name__}")


BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """A TOML key: bare when it can be, else a quoted string (like "List*")."""
    return key if BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def render_toml(config: Config) -> str:
    """The configuration as a commented TOML template; defaults commented, changes live."""
    lines = [HEADER]
    _render_table(lines, config, Config(), ROOT_TABLE)
    return "\n".join(lines).rstrip() + "\n"


def _render_table(lines: list[str], table: Any, default: Any, name: str) -> None:
    doc = (type(table).__doc__ or "").strip().splitlines()[0]
    lines.append(f"# {doc}")
    lines.append(f"[{name}]")
    lines.append("")
    subtables = []
    named_tables = []
    maps = []
    for f in dataclasses.fields(table):
        if is_table(f):
            subtables.append(f)
            continue
        if (item_type := table_of(f)) is not None:
            named_tables.append((f, item_type))
            continue
        if map_of(f) is not None:
            maps.append(f)
            continue
        value = getattr(table, f.name)
        for doc_line in f.metadata.get("doc", "").splitlines():
            lines.append(f"# {doc_line}")
        prefix = "# " if value == getattr(default, f.name) else ""
        lines.append(f"{prefix}{f.name} = {toml_value(value)}")
        lines.append("")
    for f in maps:
        # A table of values comes after all plain keys of its table; empty (the default) it is
        # shown commented out.
        for doc_line in f.metadata.get("doc", "").splitlines():
            lines.append(f"# {doc_line}")
        entries = getattr(table, f.name)
        prefix = "" if entries else "# "
        lines.append(f"{prefix}[{name}.{f.name}]")
        for key, value in entries.items():
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
        lines.append("")
    for f, item_type in named_tables:
        defaults = getattr(default, f.name)
        for item_name, item in getattr(table, f.name).items():
            _render_table(lines, item, defaults.get(item_name, item_type()), f"{name}.{f.name}.{item_name}")
    for f in subtables:
        _render_table(lines, getattr(table, f.name), getattr(default, f.name), f"{name}.{f.name}")
