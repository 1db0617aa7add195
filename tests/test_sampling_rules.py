"""Per-method sampling rules (`sampling_overrides`) and error-biased keeping
(`tracing_always_sample_errors`), against a real daemon and a real OTLP receiver."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pycrio.cri import api_pb2
from pycrio.tracing.sampling import SamplingRules
from tests.harness import metadata_with_parent, run_pycrio, tracing_args
from tests.otlp_receiver import STATUS_ERROR

RUNTIME = "/runtime.v1.RuntimeService/"
VERSION = RUNTIME + "Version"
LIST = RUNTIME + "ListContainers"
STATUS = RUNTIME + "ContainerStatus"


def _config(*lines: str, always_errors: bool = False) -> str:
    text = "[pycrio.tracing]\n"
    if always_errors:
        text += "tracing_always_sample_errors = true\n"
    return text + "[pycrio.tracing.sampling_overrides]\n" + "".join(f"{line}\n" for line in lines)


def _drive(daemon, version: int = 0, list_containers: int = 0, metadata=None) -> None:
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for _ in range(version):
            stub.Version(api_pb2.VersionRequest(), metadata=metadata, timeout=5)
        for _ in range(list_containers):
            stub.ListContainers(api_pb2.ListContainersRequest(), metadata=metadata, timeout=5)


def _names(spans) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in spans:
        counts[s.name] = counts.get(s.name, 0) + 1
    return counts


def test_precedence_full_then_short_then_longest_glob() -> None:
    rules = SamplingRules(
        7,
        {
            "List*": 1,
            "ListContainers": 2,
            "/runtime.v1.RuntimeService/ListPodSandbox": 3,
            "ListPodSandbox": 4,
            "ListContainer*": 5,
            "/runtime.v1.ImageService/*": 6,
        },
    )
    assert rules.rate_for(RUNTIME + "ListContainers") == 2  # exact short beats globs
    assert rules.rate_for(RUNTIME + "ListPodSandbox") == 3  # exact full beats exact short
    assert rules.rate_for(RUNTIME + "ListContainerStats") == 5  # longest glob
    assert rules.rate_for(RUNTIME + "ListMetricDescriptors") == 1
    assert rules.rate_for("/runtime.v1.ImageService/ListImages") == 6  # a glob over the full name
    assert rules.rate_for(VERSION) == 7  # the global rate
    assert SamplingRules(0, {"List*": 0}).any_root_traces is False
    assert SamplingRules(0, {"Version": 1}).any_root_traces is True


def test_global_zero_with_one_method_fully_traced(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=0), config_text=_config("Version = 1000000"))
    _drive(daemon, version=10, list_containers=50)
    assert daemon.stop() == 0
    spans = receiver.settle(quiet=0.5)
    # 10 calls plus the harness's start-up Version probe; ListContainers stays untraced.
    assert _names(spans) == {VERSION: 11}
    assert len({s.trace_id for s in spans}) == 11
    assert all(s.parent_span_id == "" for s in spans)


@pytest.mark.timeout(900)
def test_glob_rate_over_many_calls_while_global_rate_traces_the_rest(make_daemon, receiver) -> None:
    daemon = make_daemon(
        args=tracing_args(receiver.endpoint, rate=1_000_000), config_text=_config('"List*" = 10000')
    )
    _drive(daemon, version=200)
    # 20000 calls from 4 client threads: sequentially they take minutes on a busy shared machine.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _drive(daemon, list_containers=5_000), range(4)))
    assert daemon.stop() == 0
    counts = _names(receiver.settle(quiet=0.5, timeout=30))
    assert counts.get(VERSION) == 201  # every call, plus the start-up probe
    kept = counts.get(LIST, 0)
    assert 100 <= kept <= 300, kept  # 0.5%..1.5% of 20000
    assert set(counts) == {VERSION, LIST}


def test_exact_name_beats_glob(make_daemon, receiver) -> None:
    config = _config('"List*" = 1000000', "ListContainers = 0", '"/runtime.v1.RuntimeService/Version" = 0',
                     '"Ver*" = 1000000')
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=0), config_text=config)
    _drive(daemon, version=10, list_containers=10)
    with daemon.channel() as ch:
        stub = daemon.runtime(ch)
        for _ in range(5):
            stub.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=5)
    assert daemon.stop() == 0
    assert _names(receiver.settle(quiet=0.5)) == {RUNTIME + "ListPodSandbox": 5}


def test_overrides_do_not_change_parent_based_decisions(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=0), config_text=_config("Version = 1000000"))
    receiver.wait_for(lambda s: s.name == VERSION)
    receiver.clear()
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    _drive(daemon, version=5, metadata=metadata_with_parent(secrets.token_hex(16), parent, sampled=False))
    _drive(daemon, list_containers=1, metadata=metadata_with_parent(trace_id, parent, sampled=True))
    assert daemon.stop() == 0
    spans = receiver.settle(quiet=0.5)
    assert [(s.name, s.trace_id, s.parent_span_id) for s in spans] == [(LIST, trace_id, parent)]


def _failing_status_call(daemon, metadata=None) -> None:
    with daemon.channel() as ch:
        with pytest.raises(grpc.RpcError) as failed:
            daemon.runtime(ch).ContainerStatus(
                api_pb2.ContainerStatusRequest(container_id="no-such-container"), metadata=metadata, timeout=5
            )
    assert failed.value.code() is grpc.StatusCode.NOT_FOUND


def test_errors_are_kept_at_rate_zero(make_daemon, receiver) -> None:
    daemon = make_daemon(args=tracing_args(receiver.endpoint, rate=0), config_text=_config(always_errors=True))
    _drive(daemon, version=5, list_containers=20)
    _failing_status_call(daemon)
    # An unsampled caller's failing call is kept as well, as a child of the caller's span.
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    _failing_status_call(daemon, metadata=metadata_with_parent(trace_id, parent, sampled=False))
    _drive(daemon, list_containers=5, metadata=metadata_with_parent(secrets.token_hex(16), parent, sampled=False))
    assert daemon.stop() == 0
    spans = receiver.settle(quiet=0.5)
    assert _names(spans) == {STATUS: 2}, _names(spans)
    for s in spans:
        assert s.status_code == STATUS_ERROR
        assert s.status_message.startswith("NOT_FOUND")
        assert s.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert s.attributes["pycrio.sampling.kept_for_error"] is True
    assert (spans[1].trace_id, spans[1].parent_span_id) == (trace_id, parent)
    assert spans[0].parent_span_id == ""


def test_errors_option_leaves_sampled_calls_alone(make_daemon, receiver) -> None:
    daemon = make_daemon(
        args=tracing_args(receiver.endpoint, rate=0), config_text=_config("ContainerStatus = 1000000", always_errors=True)
    )
    _drive(daemon, version=3)
    _failing_status_call(daemon)
    assert daemon.stop() == 0
    spans = receiver.settle(quiet=0.5)
    assert [s.name for s in spans] == [STATUS]
    assert spans[0].status_code == STATUS_ERROR
    assert "pycrio.sampling.kept_for_error" not in spans[0].attributes  # sampled, not kept for its error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[pycrio.tracing.sampling_overrides]\n"List*" = 5000000\n',
         "pycrio.tracing.sampling_overrides.List*: must be between 0 and 1000000, got 5000000"),
        ("[pycrio.tracing.sampling_overrides]\nVersion = -1\n",
         "pycrio.tracing.sampling_overrides.Version: must be between 0 and 1000000, got -1"),
        ('[pycrio.tracing.sampling_overrides]\nVersion = "all"\n',
         "pycrio.tracing.sampling_overrides.Version: must be an integer, got a string 'all'"),
        ("[pycrio.tracing.sampling_overrides]\nVersion = 0.5\n",
         "pycrio.tracing.sampling_overrides.Version: must be an integer, got a float 0.5"),
        ("[pycrio.tracing.sampling_overrides]\nVersion = true\n",
         "pycrio.tracing.sampling_overrides.Version: must be an integer, got a boolean True"),
        ('[pycrio.tracing.sampling_overrides]\n"" = 1\n', "pycrio.tracing.sampling_overrides.: must be a CRI method"),
        ("[pycrio.tracing]\nsampling_overrides = 5\n", "pycrio.tracing.sampling_overrides: must be a table"),
        ('[pycrio.tracing]\ntracing_always_sample_errors = "yes"\n',
         "pycrio.tracing.tracing_always_sample_errors: must be a boolean, got a string 'yes'"),
    ],
)
def test_invalid_rules_are_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    conf, confd = tmp_path / "pycrio.conf", tmp_path / "conf.d"
    conf.write_text("")
    confd.mkdir()
    (confd / "50-rules.conf").write_text(text)
    args = ["--config", str(conf), "--config-dir", str(confd)]
    for command in (["config"], ["--listen", str(tmp_path / "s.sock"), "--root", str(tmp_path / "r"),
                                 "--runroot", str(tmp_path / "rr"), "--enable-tracing"]):
        result = run_pycrio(*args, *command)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0] == f"pycrio: {confd / '50-rules.conf'}: {expected}" or (
            lines[0].startswith(f"pycrio: {confd / '50-rules.conf'}: ") and expected in lines[0]
        ), lines[0]


CALL_SAMPLER_CASES = [
    ("root at rate 0", VERSION, None, None),
    ("root at 1000000", LIST, None, None),
    ("root at a ratio", STATUS, None, None),
    ("root with sampler attributes", LIST, None, {"a": 1}),
    ("remote sampled parent", VERSION, (True, 0x01, None), None),
    ("remote unsampled parent", LIST, (True, 0x00, None), None),
    ("local sampled parent", VERSION, (False, 0x01, None), None),
    ("local unsampled parent", LIST, (False, 0x00, None), None),
    ("parent with a tracestate", VERSION, (True, 0x01, "vendor=x"), None),
    ("parent with an empty tracestate", VERSION, (True, 0x01, ""), None),
]


@pytest.mark.parametrize("name, method, parent, attributes", CALL_SAMPLER_CASES, ids=[c[0] for c in CALL_SAMPLER_CASES])
def test_call_sampler_decides_as_the_sdks_parent_based_chain(name, method, parent, attributes) -> None:
    """The daemon's sampler answers exactly what ParentBased(MethodRateSampler) answers, for
    many trace ids (the ratio case depends on them)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import ParentBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from opentelemetry.trace.span import TraceState

    from pycrio.tracing.sampling import CallSampler, MethodRateSampler

    rules = SamplingRules(1_000_000, {"Version": 0, "ContainerStatus": 500_000})
    ours, sdk = CallSampler(rules), ParentBased(root=MethodRateSampler(rules))
    context = None
    if parent is not None:
        remote, flags, state = parent
        trace_state = TraceState.from_header([state]) if state is not None else None
        span_context = SpanContext(0xAB, 0xCD, is_remote=remote, trace_flags=TraceFlags(flags), trace_state=trace_state)
        context = trace.set_span_in_context(NonRecordingSpan(span_context))
    decisions = set()
    for trace_id in [0xAB, *(secrets.randbits(128) for _ in range(200))]:
        a = ours.should_sample(context, trace_id, method, attributes=attributes)
        b = sdk.should_sample(context, trace_id, method, attributes=attributes)
        assert (a.decision, dict(a.attributes), a.trace_state) == (b.decision, dict(b.attributes), b.trace_state)
        decisions.add(a.decision)
    if name == "root at a ratio":
        assert len(decisions) == 2  # both answers came up: the ids mattered
    assert ours.get_description() == sdk.get_description()
