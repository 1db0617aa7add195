"""`pycrio status`: ask a running daemon over its CRI socket (Status, verbose) and print the answer."""

from __future__ import annotations

import json
import time
from typing import Any

STATUS_LABELS = (
    ("spans_started", "spans started"),
    ("spans_kept_for_error", "spans kept for their error"),
    ("spans_exported", "spans exported"),
    ("spans_dropped_queue_full", "spans dropped, queue full"),
    ("spans_dropped_export_failed", "spans dropped, export failed"),
    ("failed_exports", "failed exports"),
    ("spans_relayed", "monitors' spans relayed"),
    ("spans_relay_dropped", "monitors' spans dropped"),
)


class StatusUnavailable(Exception):
    """The daemon did not answer; the message says where and why."""


def fetch_status(listen: str, timeout: float = 5.0) -> dict[str, Any]:
    """Status(verbose=true) from the daemon on `listen`, with its JSON info fields decoded."""
    import grpc

    from pycrio.cri import api_pb2, api_pb2_grpc

    target = listen if listen.startswith("unix:") else f"unix://{listen}"
    with grpc.insecure_channel(target) as channel:
        try:
            response = api_pb2_grpc.RuntimeServiceStub(channel).Status(
                api_pb2.StatusRequest(verbose=True), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise StatusUnavailable(f"no answer from {listen}: {exc.code().name}: {exc.details()}") from None
    report: dict[str, Any] = {
        "conditions": [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
            for c in response.status.conditions
        ]
    }
    for key, value in response.info.items():
        if key == "config":
            continue
        try:
            report[key] = json.loads(value)
        except ValueError:
            report[key] = value
    report["listen"] = listen
    return report


def _when(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "never"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
    return f"{iso} ({max(0.0, now - stamp):.0f}s ago)"


def render_status(report: dict[str, Any], output: str = "text") -> str:
    """The report as JSON, or as aligned text for people."""
    if output == "json":
        return json.dumps(report, indent=2, sort_keys=True) + "\n"
    now = time.time()
    version = report.get("version", {})
    daemon = report.get("daemon", {})
    lines = [
        f"pycrio {version.get('runtime_version', '?')} on {report['listen']}"
        f" (pid {daemon.get('pid', '?')}, up {daemon.get('uptime_seconds', 0):.0f}s)",
        "conditions:",
    ]
    for c in report["conditions"]:
        detail = f" ({c['reason']}: {c['message']})" if not c["status"] and c["reason"] else ""
        lines.append(f"  {c['type']:<32}{str(c['status']).lower()}{detail}")
    tracing = report.get("tracing", {})
    if tracing.get("enabled"):
        overrides = ", ".join(f"{k}={v}" for k, v in sorted(tracing.get("sampling_overrides", {}).items()))
        lines.append(
            f"tracing: enabled, OTLP/gRPC to {tracing['endpoint']}, {tracing['sampling_rate_per_million']} per million"
            + (f" (overrides: {overrides})" if overrides else "")
            + (", keeping error spans" if tracing.get("always_sample_errors") else "")
        )
    else:
        lines.append("tracing: disabled")
    export = tracing.get("export", {})
    if export:
        for key, label in STATUS_LABELS:
            lines.append(f"  {label:<32}{export.get(key, 0)}")
        lines.append(f"  {'last successful export':<32}{_when(export.get('last_export_success'), now)}")
        if export.get("failing_since") is not None:
            lines.append(f"  {'failing since':<32}{_when(export['failing_since'], now)}")
        if export.get("last_export_error"):
            lines.append(
                f"  {'last export error':<32}{_when(export.get('last_export_error_time'), now)}: {export['last_export_error']}"
            )
    metrics = report.get("metrics", {})
    if metrics.get("enabled"):
        lines.append(
            f"metrics: enabled, OTLP/gRPC to {metrics.get('otlp_endpoint') or '(none)'}"
            f", Prometheus {metrics.get('prometheus') or 'off'}"
        )
        if metrics.get("otlp_endpoint"):
            lines.append(f"  {'last successful push':<32}{_when(metrics.get('otlp_last_success'), now)}")
            if metrics.get("otlp_failed_exports"):
                lines.append(f"  {'failed pushes in a row':<32}{metrics['otlp_failed_exports']}")
    else:
        lines.append("metrics: disabled")
    return "\n".join(lines) + "\n"
