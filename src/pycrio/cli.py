"""The `pycrio` command: the daemon (default), `config` and `version`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from pycrio import __version__
from pycrio.config import LOG_LEVELS, MAX_SAMPLING_RATE, Config, ConfigError, LoadedConfig, Override, load_config, render_toml

DEFAULT_CONFIG = "/etc/pycrio/pycrio.conf"
DEFAULT_CONFIG_DIR = "/etc/pycrio/conf.d"
CRI_API_MODULE = "k8s.io/cri-api v0.37.2"

# CLI parameter -> dotted key in the configuration (below [pycrio]).
OVERRIDABLE = {
    "listen": "api.listen",
    "root": "root",
    "runroot": "runroot",
    "log_level": "log_level",
    "enable_tracing": "tracing.enable_tracing",
    "tracing_endpoint": "tracing.tracing_endpoint",
    "tracing_sampling_rate_per_million": "tracing.tracing_sampling_rate_per_million",
}

log = logging.getLogger("pycrio")

# gRPC's C core prints its own INFO lines (GOAWAYs, reconnects) to stderr unless told not to;
# they are not structured and not ours. Set before grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _overrides(ctx: click.Context) -> list[Override]:
    """Flags and PYCRIO_* variables that were actually given; the rest leave the files alone."""
    result = []
    for param, key in OVERRIDABLE.items():
        source = ctx.get_parameter_source(param)
        if source is ParameterSource.COMMANDLINE:
            origin = "--" + param.replace("_", "-")
        elif source is ParameterSource.ENVIRONMENT:
            origin = "PYCRIO_" + param.upper()
        else:
            continue
        result.append(Override(key, ctx.params[param], origin))
    return result


def _loader(ctx: click.Context) -> Callable[[], LoadedConfig]:
    """Loads the configuration as this command line says; raises ConfigError (used again on SIGHUP)."""
    config_source = ctx.get_parameter_source("config")
    explicit = config_source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    config_file, config_dir, overrides = Path(ctx.params["config"]), Path(ctx.params["config_dir"]), _overrides(ctx)
    return lambda: load_config(config_file, config_dir, overrides, require_file=explicit)


def _load(ctx: click.Context) -> LoadedConfig:
    try:
        return _loader(ctx)()
    except ConfigError as exc:
        click.echo(f"pycrio: {exc}", err=True)
        sys.exit(1)


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "PYCRIO", "show_default": True},
)
@click.option("-c", "--config", default=DEFAULT_CONFIG, type=click.Path(dir_okay=False),
              help="Main TOML configuration file (lowest-precedence file).")
@click.option("-d", "--config-dir", default=DEFAULT_CONFIG_DIR, type=click.Path(file_okay=False),
              help="Directory of drop-in *.conf files, applied in lexical order over the main file.")
@click.option("--listen", default=Config().api.listen, help="Unix socket to serve the CRI on.")
@click.option("--root", default=Config().root, help="Directory for persistent data.")
@click.option("--runroot", default=Config().runroot, help="Directory for runtime state.")
@click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS),
              help="Log level; at debug every CRI request and response is logged.")
@click.option("--enable-tracing/--disable-tracing", default=False,
              help="Export OpenTelemetry spans of CRI calls over OTLP/gRPC.")
@click.option("--tracing-endpoint", default=Config().tracing.tracing_endpoint,
              help="host:port of the OTLP/gRPC receiver.")
@click.option("--tracing-sampling-rate-per-million", default=0, type=click.IntRange(0, MAX_SAMPLING_RATE),
              help="Calls per million that start a trace; 0 only continues callers' sampled traces.")
@click.version_option(__version__, "--version", prog_name="pycrio")
@click.pass_context
def main(ctx: click.Context, **_: Any) -> None:
    """pycrio: a Kubernetes CRI v1 runtime, traced end to end with OpenTelemetry.

    Without a command, runs the daemon. Every option can also be set through the environment as
    PYCRIO_<OPTION> (for example PYCRIO_ENABLE_TRACING=true); options given on the command line or
    in the environment override the configuration files. SIGHUP makes a running daemon re-read
    its configuration files and apply log_level and [pycrio.tracing] at once.
    """
    if ctx.invoked_subcommand is not None:
        return
    loaded = _load(ctx)
    run_daemon(loaded, _loader(ctx))


def run_daemon(loaded: LoadedConfig, load_again: Callable[[], LoadedConfig]) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the configuration through `load_again`."""
    # Imported here so `pycrio config`/`version`/`--help` stay fast.
    from pycrio.log import setup_logging
    from pycrio.server import StartupError, serve

    setup_logging(loaded.config.log_level)
    for warning in loaded.warnings:
        log.warning(warning)
    log.info("configuration loaded from %s", ", ".join(map(str, loaded.files)) or "built-in defaults")
    try:
        code = serve(loaded, load_again)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)
    sys.exit(code)


@main.command()
@click.option("--default", "defaults_only", is_flag=True, help="Print the built-in defaults only.")
@click.pass_context
def config(ctx: click.Context, defaults_only: bool) -> None:
    """Print the effective configuration as commented TOML that pycrio loads back."""
    if defaults_only:
        click.echo(render_toml(Config()), nl=False)
        return
    loaded = _load(ctx.parent)  # type: ignore[arg-type]
    for warning in loaded.warnings:
        click.echo(f"pycrio: warning: {warning}", err=True)
    click.echo(render_toml(loaded.config), nl=False)


@main.command()
def version() -> None:
    """Print pycrio's version and the CRI API it serves."""
    import grpc
    import opentelemetry.sdk.version as otel_version

    click.echo(f"pycrio version {__version__}")
    click.echo(f"CRI API: runtime.v1 ({CRI_API_MODULE})")
    click.echo(f"Python: {sys.version.split()[0]}, grpcio {grpc.__version__}, opentelemetry-sdk {otel_version.__version__}")


@main.command()
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", help="Output format.")
@click.option("--timeout", default=5.0, type=float, help="Seconds to wait for the daemon.")
@click.pass_context
def status(ctx: click.Context, output: str, timeout: float) -> None:
    """Ask the running daemon (on --listen) for its conditions, tracing export health and metrics."""
    from pycrio.status_client import StatusUnavailable, fetch_status, render_status

    parent = ctx.parent
    assert parent is not None
    listen = parent.params["listen"]
    if parent.get_parameter_source("listen") not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
        listen = _load(parent).config.api.listen
    try:
        report = fetch_status(listen, timeout)
    except StatusUnavailable as exc:
        click.echo(f"pycrio: {exc}", err=True)
        sys.exit(1)
    click.echo(render_status(report, output), nl=False)
