"""Configuration: precedence, drop-in order, validation errors, `pycrio config` round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pycrio.config import Config, load_config
from tests.harness import run_pycrio


def _files(tmp_path: Path, main: str = "", **dropins: str) -> list[str]:
    conf = tmp_path / "pycrio.conf"
    conf.write_text(main)
    confd = tmp_path / "conf.d"
    confd.mkdir(exist_ok=True)
    for name, text in dropins.items():
        (confd / name).write_text(text)
    return ["--config", str(conf), "--config-dir", str(confd)]


def _effective(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Config:
    """Run `pycrio ... config`, then load its output as a config file: the round trip must hold."""
    result = run_pycrio(*args, "config", env=env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "effective.conf"
    out.write_text(result.stdout)
    return load_config(out, tmp_path / "no-such-dir").config


def test_defaults(tmp_path: Path) -> None:
    result = run_pycrio("config", "--default")
    assert result.returncode == 0
    assert "[pycrio.tracing]" in result.stdout
    assert '# tracing_endpoint = "127.0.0.1:4317"' in result.stdout
    assert "# tracing_sampling_rate_per_million = 0" in result.stdout
    assert _effective(tmp_path, *_files(tmp_path)) == Config()


def test_main_file_then_dropins_in_lexical_order_then_flags_and_env(tmp_path: Path) -> None:
    args = _files(
        tmp_path,
        main='[pycrio]\nlog_level = "warn"\nroot = "/srv/main"\n[pycrio.tracing]\nenable_tracing = true\n'
        'tracing_sampling_rate_per_million = 1\n',
        **{
            "10-b.conf": '[pycrio.tracing]\ntracing_sampling_rate_per_million = 10\ntracing_endpoint = "b:1"\n',
            "02-a.conf": '[pycrio.tracing]\ntracing_sampling_rate_per_million = 2\n[pycrio]\nrunroot = "/run/a"\n',
            "20-c.conf": '[pycrio]\nlog_level = "debug"\n',
            "30-ignored.txt": "not toml [",  # only *.conf files are drop-ins
        },
    )
    config = _effective(tmp_path, *args)
    assert config.root == "/srv/main"  # main file, untouched by drop-ins
    assert config.runroot == "/run/a"  # 02-a only
    assert config.tracing.tracing_sampling_rate_per_million == 10  # 10-b beats 02-a beats main
    assert config.tracing.tracing_endpoint == "b:1"
    assert config.log_level == "debug"  # 20-c beats main
    assert config.tracing.enable_tracing is True

    flagged = _effective(tmp_path, *args, "--tracing-sampling-rate-per-million", "7", "--log-level", "info")
    assert flagged.tracing.tracing_sampling_rate_per_million == 7
    assert flagged.log_level == "info"
    assert flagged.tracing.tracing_endpoint == "b:1"  # flags not given leave the files alone

    env = {"PYCRIO_TRACING_ENDPOINT": "env-host:4317", "PYCRIO_ENABLE_TRACING": "false", "PYCRIO_ROOT": "/srv/env"}
    from_env = _effective(tmp_path, *args, env=env)
    assert from_env.tracing.tracing_endpoint == "env-host:4317"
    assert from_env.tracing.enable_tracing is False
    assert from_env.root == "/srv/env"
    both = _effective(tmp_path, *args, "--root", "/srv/flag", env=env)
    assert both.root == "/srv/flag"  # a flag beats its environment variable


def test_config_output_comments_defaults_and_keeps_changes_live(tmp_path: Path) -> None:
    args = _files(tmp_path, main='[pycrio.tracing]\nenable_tracing = true\n')
    out = run_pycrio(*args, "--listen", "/tmp/x y/\"q\".sock", "config").stdout
    assert "\nenable_tracing = true\n" in out
    assert '\n# tracing_endpoint = "127.0.0.1:4317"\n' in out
    assert '\nlisten = "/tmp/x y/\\"q\\".sock"\n' in out
    config = _effective(tmp_path, *args, "--listen", '/tmp/x y/"q".sock')
    assert config.api.listen == '/tmp/x y/"q".sock'
    assert config.tracing.enable_tracing is True


def test_missing_dropin_dir_is_fine(tmp_path: Path) -> None:
    conf = tmp_path / "pycrio.conf"
    conf.write_text("")
    result = run_pycrio("--config", str(conf), "--config-dir", str(tmp_path / "absent"), "config")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[pycrio\nroot = 1", "invalid TOML: "),
        ('[pycrio]\nlog_level = "loud"\n', "pycrio.log_level: must be one of error, warn, info, debug, trace, got 'loud'"),
        ("[pycrio.tracing]\nenable_tracing = 1\n", "pycrio.tracing.enable_tracing: must be a boolean, got an integer 1"),
        ('[pycrio.tracing]\ntracing_sampling_rate_per_million = "all"\n',
         "pycrio.tracing.tracing_sampling_rate_per_million: must be an integer, got a string 'all'"),
        ("[pycrio.tracing]\ntracing_sampling_rate_per_million = true\n",
         "pycrio.tracing.tracing_sampling_rate_per_million: must be an integer, got a boolean True"),
        ("[pycrio.tracing]\ntracing_sampling_rate_per_million = 1000001\n",
         "pycrio.tracing.tracing_sampling_rate_per_million: must be between 0 and 1000000, got 1000001"),
        ("[pycrio.tracing]\ntracing_sampling_rate_per_million = -1\n",
         "pycrio.tracing.tracing_sampling_rate_per_million: must be between 0 and 1000000, got -1"),
        ('[pycrio.tracing]\ntracing_endpoint = "http://collector:4317"\n',
         "pycrio.tracing.tracing_endpoint: must be host:port (like 127.0.0.1:4317), got 'http://collector:4317'"),
        ('[pycrio.tracing]\ntracing_endpoint = "collector"\n', "pycrio.tracing.tracing_endpoint: must be host:port"),
        ('[pycrio]\nroot = "relative/dir"\n', "pycrio.root: must be an absolute path, got 'relative/dir'"),
        ('[pycrio]\ntracing = "on"\n', "pycrio.tracing: must be a table"),
    ],
)
@pytest.mark.parametrize("where", ["main", "dropin"])
def test_invalid_file_is_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str, where: str) -> None:
    if where == "main":
        args, bad = _files(tmp_path, main=text), tmp_path / "pycrio.conf"
    else:
        args, bad = _files(tmp_path, **{"50-bad.conf": text}), tmp_path / "conf.d" / "50-bad.conf"
    for command in (["config"], ["--listen", str(tmp_path / "s.sock"), "--root", str(tmp_path / "r"),
                                 "--runroot", str(tmp_path / "rr")]):
        result = run_pycrio(*args, *command)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"pycrio: {bad}: "), lines[0]
        assert expected in lines[0]
    if "invalid TOML" in expected:
        assert "line 1" in lines[0] or "line 2" in lines[0]


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--tracing-sampling-rate-per-million", "2000000", "2000000 is not in the range 0<=x<=1000000"),
        ("--tracing-endpoint", "nohost", "--tracing-endpoint: pycrio.tracing.tracing_endpoint: must be host:port"),
        ("--log-level", "chatty", "'chatty' is not one of"),
        ("--root", "rel", "--root: pycrio.root: must be an absolute path"),
    ],
)
def test_invalid_flag_is_rejected(tmp_path: Path, flag: str, value: str, expected: str) -> None:
    result = run_pycrio(*_files(tmp_path), flag, value, "config")
    assert result.returncode != 0
    assert expected in result.stderr


def test_invalid_env_value_names_the_variable(tmp_path: Path) -> None:
    result = run_pycrio(*_files(tmp_path), "config", env={"PYCRIO_TRACING_ENDPOINT": "a/b"})
    assert result.returncode == 1
    assert "pycrio: PYCRIO_TRACING_ENDPOINT: pycrio.tracing.tracing_endpoint: must be host:port" in result.stderr


def test_unknown_keys_warn_and_the_daemon_still_starts(tmp_path: Path, make_daemon) -> None:
    text = '[pycrio]\nfrobnicate = 1\n[pycrio.tracing]\nsampling = 5\n[other]\nx = 1\n'
    result = run_pycrio(*_files(tmp_path, main=text), "config")
    assert result.returncode == 0
    assert f"{tmp_path / 'pycrio.conf'}: unknown key 'pycrio.frobnicate' ignored" in result.stderr
    assert "unknown key 'pycrio.tracing.sampling' ignored" in result.stderr
    assert "unknown key 'other' ignored" in result.stderr

    daemon = make_daemon(config_text=text)
    assert daemon.version().runtime_name == "pycrio"
    logs = daemon.logs()
    assert "level=warn" in logs and "unknown key 'pycrio.frobnicate' ignored" in logs


def test_explicit_missing_config_file_is_an_error(tmp_path: Path) -> None:
    result = run_pycrio("--config", str(tmp_path / "nope.conf"), "config")
    assert result.returncode == 1
    assert result.stderr.strip() == f"pycrio: {tmp_path / 'nope.conf'}: config file not found"


def test_runtime_handlers_are_named_tables(tmp_path: Path) -> None:
    args = _files(
        tmp_path,
        main='[pycrio.runtime]\ndefault_runtime = "fast"\n'
        '[pycrio.runtime.runtimes.fast]\nruntime_path = "/usr/local/bin/runc-fast"\n'
        '[pycrio.runtime.runtimes.runc]\nruntime_root = "/run/runc-alt"\n',
    )
    config = _effective(tmp_path, *args)
    assert config.runtime.default_runtime == "fast"
    assert config.runtime.runtimes["fast"].runtime_path == "/usr/local/bin/runc-fast"
    assert config.runtime.runtimes["fast"].runtime_type == "oci"
    assert config.runtime.runtimes["runc"].runtime_root == "/run/runc-alt"
    assert config.runtime.runtimes["runc"].runtime_path == "runc"  # untouched keys keep their default
    assert set(config.runtime.runtimes) == {"runc", "crun", "fast"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[pycrio.runtime]\ndefault_runtime = "nope"\n',
         "pycrio.runtime.default_runtime: 'nope' is not a configured runtime (crun, runc)"),
        ('[pycrio.runtime.runtimes.x]\nruntime_type = "vm"\n',
         "pycrio.runtime.runtimes.x.runtime_type: must be one of oci, pod, got 'vm'"),
        ('[pycrio.runtime.runtimes]\nx = 1\n', "pycrio.runtime.runtimes.x: must be a table"),
        ('[pycrio.image]\ninsecure_registries = "r:1"\n', "pycrio.image.insecure_registries: must be an array"),
        ('[pycrio.image]\nplatform = "amd64"\n', "pycrio.image.platform: must be os/arch"),
    ],
)
def test_invalid_runtime_and_image_tables(tmp_path: Path, text: str, expected: str) -> None:
    result = run_pycrio(*_files(tmp_path, main=text), "config")
    assert result.returncode == 1
    assert f"pycrio: {tmp_path / 'pycrio.conf'}: {expected}" in result.stderr


def test_sampling_overrides_round_trip_and_merge_per_key(tmp_path: Path) -> None:
    args = _files(
        tmp_path,
        main='[pycrio.tracing]\ntracing_always_sample_errors = true\n[pycrio.tracing.sampling_overrides]\n'
        'Version = 1000000\n"List*" = 10000\n',
        **{"10-more.conf": '[pycrio.tracing.sampling_overrides]\n"List*" = 20000\n'
                           '"/runtime.v1.RuntimeService/ListContainers" = 0\n'},
    )
    out = run_pycrio(*args, "config").stdout
    assert "\n[pycrio.tracing.sampling_overrides]\n" in out
    assert '\n"List*" = 20000\n' in out
    config = _effective(tmp_path, *args)
    assert config.tracing.tracing_always_sample_errors is True
    assert config.tracing.sampling_overrides == {
        "Version": 1000000, "List*": 20000, "/runtime.v1.RuntimeService/ListContainers": 0,
    }
    default = run_pycrio("config", "--default").stdout
    assert "\n# [pycrio.tracing.sampling_overrides]\n" in default
    assert "\n# tracing_always_sample_errors = false\n" in default
