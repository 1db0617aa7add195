"""The typed configuration schema: every table and key pycrio understands, with defaults and docs.

A dataclass is a TOML table below `[pycrio]`; a field whose type is a dataclass is a sub-table.
The loader, the validator and the `pycrio config` writer all walk this one description.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
MAX_SAMPLING_RATE = 1_000_000


def _doc(text: str, check: Callable[[Any], str | None] | None = None) -> dict[str, Any]:
    """Field metadata: the comment `pycrio config` prints, and an optional value check."""
    return {"doc": text, "check": check}


def check_absolute_path(value: str) -> str | None:
    if not value.startswith("/"):
        return f"must be an absolute path, got {value!r}"
    return None


def check_log_level(value: str) -> str | None:
    if value not in LOG_LEVELS:
        return f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}"
    return None


def check_sampling_rate(value: int) -> str | None:
    if not 0 <= value <= MAX_SAMPLING_RATE:
        return f"must be between 0 and {MAX_SAMPLING_RATE}, got {value}"
    return None


def check_method_pattern(value: str) -> str | None:
    """A key of sampling_overrides: a CRI method, short or full, or an fnmatch glob of either."""
    if not value or value != value.strip():
        return f"must be a CRI method name or glob (like Version, /runtime.v1.RuntimeService/Version or List*), got {value!r}"
    return None


def check_host_port(value: str) -> str | None:
    """An OTLP/gRPC endpoint is `host:port` (IPv6 hosts in brackets), without a scheme."""
    problem = f"must be host:port (like 127.0.0.1:4317), got {value!r}"
    if "://" in value or "/" in value:
        return problem
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return problem
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return problem
    return None


def check_host_port_or_empty(value: str) -> str | None:
    return check_host_port(value) if value else None


def check_port(value: int) -> str | None:
    if not 0 <= value < 65536:
        return f"must be a TCP port between 1 and 65535, or 0 for off, got {value}"
    return None


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str) -> float:
    """Seconds in a Go-style duration ("4h", "1h30m", "90s", "500ms"); ValueError if it is not one."""
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def check_duration(value: str) -> str | None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return f"must be a duration like 4h, 30m, 90s or 500ms, got {value!r}"
    return None if seconds > 0 else f"must be longer than 0, got {value!r}"


def check_stream_address(value: str) -> str | None:
    if not value or any(c in value for c in " /[]") or value.count(":") == 1:
        return f"must be an IP address or host name without a port (like 127.0.0.1 or ::1), got {value!r}"
    return None


def check_stream_port(value: int) -> str | None:
    if not 0 <= value < 65536:
        return f"must be a TCP port between 1 and 65535, or 0 for a free one, got {value}"
    return None


def check_absolute_or_empty(value: str) -> str | None:
    return check_absolute_path(value) if value else None


def check_platform(value: str) -> str | None:
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        return f"must be os/arch or os/arch/variant (like linux/amd64), got {value!r}"
    return None


def check_registries(value: list[str]) -> str | None:
    for item in value:
        if not item or "/" in item or item != item.strip():
            return f"must list registry hosts (like docker.io or 127.0.0.1:5000), got {item!r}"
    return None


def check_positive(value: int) -> str | None:
    if value < 1:
        return f"must be at least 1, got {value}"
    return None


@dataclass
class APIConfig:
    """Table [pycrio.api]: how pycrio serves the CRI."""

    listen: str = field(
        default="/run/pycrio/pycrio.sock",
        metadata=_doc("Path of the unix socket on which pycrio serves the CRI v1 gRPC API.", check_absolute_path),
    )
    stream_address: str = field(
        default="127.0.0.1",
        metadata=_doc(
            "Address the stream server (Exec, Attach, PortForward over SPDY and WebSocket) listens on.",
            check_stream_address,
        ),
    )
    stream_port: int = field(
        default=0,
        metadata=_doc("TCP port of the stream server; 0 picks a free port (crictl info shows it).", check_stream_port),
    )
    stream_tls_cert: str = field(
        default="",
        metadata=_doc("PEM certificate of the stream server; with stream_tls_key it serves https (reloaded when the files change).", check_absolute_or_empty),
    )
    stream_tls_key: str = field(
        default="", metadata=_doc("PEM private key of stream_tls_cert.", check_absolute_or_empty)
    )
    stream_tls_ca: str = field(
        default="",
        metadata=_doc("PEM CA bundle: when set, stream clients must present a certificate it signed.", check_absolute_or_empty),
    )
    stream_idle_timeout: str = field(
        default="4h",
        metadata=_doc("A stream connection with no traffic either way for this long is closed (like 4h, 30m, 90s).", check_duration),
    )
    stream_token_ttl: str = field(
        default="1m",
        metadata=_doc("How long the single-use URL an Exec, Attach or PortForward call returns stays valid.", check_duration),
    )


@dataclass
class TracingConfig:
    """Table [pycrio.tracing]: OpenTelemetry tracing of every CRI call."""

    enable_tracing: bool = field(
        default=False,
        metadata=_doc("Export an OpenTelemetry span for CRI calls (and the steps below them)."),
    )
    tracing_endpoint: str = field(
        default="127.0.0.1:4317",
        metadata=_doc("host:port of the OTLP/gRPC receiver (a Collector or Jaeger) spans are sent to.", check_host_port),
    )
    tracing_sampling_rate_per_million: int = field(
        default=0,
        metadata=_doc(
            "How many of a million calls start a trace of their own: 1000000 traces every call,\n"
            "0 starts none but still continues a trace whose caller (kubelet, crictl) sampled it,\n"
            "values between keep that share of trace ids (parent-based ratio).",
            check_sampling_rate,
        ),
    )
    sampling_overrides: dict[str, int] = field(
        default_factory=dict,
        metadata={
            **_doc(
                "Per-method rates per million for calls that start a trace of their own (no W3C parent),\n"
                "overriding tracing_sampling_rate_per_million. Keys: short method (Version), full method\n"
                "(\"/runtime.v1.RuntimeService/Version\") or a glob of either (\"List*\"). When several\n"
                "match: exact full name, then exact short name, then the longest glob.",
                check_sampling_rate,
            ),
            "map_of": int,
            "check_key": check_method_pattern,
        },
    )
    tracing_always_sample_errors: bool = field(
        default=False,
        metadata=_doc(
            "Also export the span of a call that ends with a non-OK status when its trace was not\n"
            "sampled. Every call then gets a (record-only) span, which costs time on every call."
        ),
    )


@dataclass
class MetricsConfig:
    """Table [pycrio.metrics]: per CRI method operation counts, latencies and errors (like CRI-O's)."""

    enable_metrics: bool = field(
        default=False,
        metadata=_doc("Collect per CRI method metrics: operations, errors and a latency histogram."),
    )
    metrics_endpoint: str = field(
        default="127.0.0.1:4317",
        metadata=_doc(
            "host:port of the OTLP/gRPC receiver metrics are pushed to; empty pushes none\n"
            "(the Prometheus endpoint alone).",
            check_host_port_or_empty,
        ),
    )
    metrics_export_interval: int = field(
        default=15,
        metadata=_doc("Seconds between two OTLP metric exports.", check_positive),
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata=_doc("Address the Prometheus endpoint listens on."),
    )
    metrics_port: int = field(
        default=0,
        metadata=_doc("TCP port of the Prometheus text endpoint (http://HOST:PORT/metrics); 0 is off.", check_port),
    )


@dataclass
class ImageConfig:
    """Table [pycrio.image]: where images come from and how they are pulled."""

    unqualified_search_registries: list[str] = field(
        default_factory=lambda: ["docker.io"],
        metadata=_doc("Registries tried in order for a short image name like busybox\n"
                      "(docker.io adds library/ to single-component names). When no pycrio file sets it,\n"
                      "a non-empty unqualified-search-registries of registries_conf is used instead.",
                      check_registries),
    )
    insecure_registries: list[str] = field(
        default_factory=list,
        metadata=_doc("Registries (host:port) reached over plain HTTP instead of HTTPS.", check_registries),
    )
    registries_conf: str = field(
        default="/etc/containers/registries.conf",
        metadata=_doc("containers-registries.conf(5) v2 file: mirrors, rewritten locations, blocked and\n"
                      "insecure registries, unqualified-search-registries (missing is fine; \"\" reads none).",
                      check_absolute_or_empty),
    )
    registries_conf_dir: str = field(
        default="/etc/containers/registries.conf.d",
        metadata=_doc("Drop-ins of registries_conf: *.conf in lexical order, each replacing the [[registry]]\n"
                      "entries of the same prefix (missing is fine; \"\" reads none).", check_absolute_or_empty),
    )
    platform: str = field(
        default="linux/amd64",
        metadata=_doc("Platform (os/arch[/variant]) picked from multi-platform images.", check_platform),
    )
    pinned_images: list[str] = field(
        default_factory=list,
        metadata=_doc("Images kubelet's garbage collection must keep: full names, or patterns with *\n"
                      "(like registry.k8s.io/pause:*); they are reported with pinned = true."),
    )
    max_parallel_downloads: int = field(
        default=3,
        metadata=_doc("Layers of one image downloaded at the same time.", check_positive),
    )


RUNTIME_TYPES = ("oci", "pod")


def check_runtime_type(value: str) -> str | None:
    if value not in RUNTIME_TYPES:
        return f"must be one of {', '.join(RUNTIME_TYPES)}, got {value!r}"
    return None


def check_name(value: str) -> str | None:
    if not value:
        return "must not be empty"
    return None


@dataclass
class RuntimeHandler:
    """Table [pycrio.runtime.runtimes.NAME]: one runtime handler the CRI can ask for by NAME."""

    runtime_path: str = field(default="", metadata=_doc("The OCI runtime binary (default: NAME found in PATH)."))
    runtime_type: str = field(
        default="oci",
        metadata=_doc('"oci": conmon + the runtime per container; "pod": one pycrio-monitor per pod.',
                      check_runtime_type),
    )
    runtime_root: str = field(
        default="",
        metadata=_doc("The runtime's state directory (default: <runroot>/runtimes/NAME).", check_absolute_or_empty),
    )


def default_runtimes() -> dict[str, RuntimeHandler]:
    return {"runc": RuntimeHandler(runtime_path="runc"), "crun": RuntimeHandler(runtime_path="crun")}


@dataclass
class RuntimeConfig:
    """Table [pycrio.runtime]: how containers are run."""

    default_runtime: str = field(
        default="runc",
        metadata=_doc("The handler used when the CRI names none; must be a key of runtimes.", check_name),
    )
    conmon: str = field(default="conmon", metadata=_doc("The conmon binary used by \"oci\" handlers.", check_name))
    pod_cgroup_parent: str = field(
        default="/pycrio",
        metadata=_doc("Cgroup under which pods without a CRI cgroup_parent get theirs (<parent>/<pod id>).",
                      check_absolute_path),
    )
    enable_pod_events: bool = field(
        default=False,
        metadata=_doc("PodSandboxStatus carries the pod's container statuses and their timestamp, which kubelet's "
                      "evented PLEG (feature gate EventedPLEG) reads instead of asking per container; "
                      "verbose calls get them anyway."),
    )
    runtimes: dict[str, RuntimeHandler] = field(
        default_factory=default_runtimes,
        metadata={**_doc("Runtime handlers by name."), "table_of": RuntimeHandler},
    )


@dataclass
class NetworkConfig:
    """Table [pycrio.network]: pod networking through CNI."""

    network_dir: str = field(
        default="/etc/cni/net.d",
        metadata=_doc("Directory of CNI network configurations; the lexically first one is used.",
                      check_absolute_path),
    )
    plugin_dirs: list[str] = field(
        default_factory=lambda: ["/usr/lib/cni", "/opt/cni/bin"],
        metadata=_doc("Directories searched for CNI plugin binaries."),
    )


@dataclass
class Config:
    """Table [pycrio]: the whole effective configuration of one daemon."""

    root: str = field(
        default="/var/lib/pycrio",
        metadata=_doc("Directory for persistent data: images, pod and container records.", check_absolute_path),
    )
    runroot: str = field(
        default="/run/pycrio",
        metadata=_doc("Directory for state that does not survive a reboot.", check_absolute_path),
    )
    log_level: str = field(
        default="info",
        metadata=_doc("Log level: error, warn, info, debug or trace. At debug every CRI request and\n"
                      "response is logged (and becomes a span event when tracing).", check_log_level),
    )
    api: APIConfig = field(default_factory=APIConfig, metadata=_doc("CRI server."))
    image: ImageConfig = field(default_factory=ImageConfig, metadata=_doc("Images."))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, metadata=_doc("Runtimes."))
    network: NetworkConfig = field(default_factory=NetworkConfig, metadata=_doc("Pod network."))
    tracing: TracingConfig = field(default_factory=TracingConfig, metadata=_doc("OpenTelemetry tracing."))
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=_doc("Metrics."))


ROOT_TABLE = "pycrio"


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value, whether given directly or by a factory."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def table_of(f: dataclasses.Field[Any]) -> type | None:
    """For a field holding named sub-tables (like runtimes.NAME), the dataclass of each."""
    return f.metadata.get("table_of")


def map_of(f: dataclasses.Field[Any]) -> type | None:
    """For a field that is a TOML table of plain values (like sampling_overrides), the value type.

    Its `check` applies to each value and its `check_key` to each key."""
    return f.metadata.get("map_of")


def is_table(f: dataclasses.Field[Any]) -> bool:
    """Whether a field is a sub-table (a nested dataclass) rather than a value."""
    return isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory)  # type: ignore[arg-type]
