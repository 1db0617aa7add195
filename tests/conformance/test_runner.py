"""The conformance runner's judgement: ginkgo JSON reports held to EXPECTED.md (no critest needed)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conformance.run import EXPECTED, Expected, Results, SpecResult, judge, read_ginkgo_json


def spec(hierarchy: list[str], leaf: str, state: str, message: str = "", kind: str = "It") -> dict:
    return {"ContainerHierarchyTexts": hierarchy, "LeafNodeText": leaf, "LeafNodeType": kind, "State": state,
            "Failure": {"Message": message} if message else None, "RunTime": 1_500_000_000}


def test_a_ginkgo_report_is_read_by_full_spec_name(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps([{"SpecReports": [
        spec(["[k8s.io] Streaming", "runtime should support streaming interfaces"], "runtime should support attach",
             "failed", "failed to attach"),
        spec(["[k8s.io] Runtime info"], "should return version info", "passed"),
        spec([], "", "passed", kind="SynchronizedBeforeSuite"),
        spec(["[k8s.io] AppArmor"], "should enforce", "skipped"),
    ]}]))

    results = read_ginkgo_json(report)

    assert [s.name for s in results.specs] == [
        "[k8s.io] Streaming runtime should support streaming interfaces runtime should support attach",
        "[k8s.io] Runtime info should return version info",
        "[k8s.io] AppArmor should enforce",
    ]
    assert [s.name for s in results.failed] == [results.specs[0].name]
    assert results.failed[0].message == "failed to attach" and results.failed[0].seconds == 1.5


def write_expected(tmp_path: Path, entries: str) -> Expected:
    path = tmp_path / "EXPECTED.md"
    path.write_text(f"# x\n\nintro `- not an entry`\n\n## Expected failures\n\n{entries}\n## Skipped\n\n- `B spec`: skipped here\n")
    return Expected.load(path)


def test_only_the_expected_failures_section_counts_and_prefixes_match(tmp_path: Path) -> None:
    expected = write_expected(tmp_path, "- `A spec one`: reason one\n- `Streaming ...`: issue 12\n")

    assert expected.entries == {"A spec one": "reason one", "Streaming ...": "issue 12"}
    assert expected.reason("Streaming exec") == "issue 12"
    assert expected.reason("A spec one") == "reason one"
    assert expected.reason("A spec one and more") is None
    assert expected.reason("B spec") is None


def test_unlisted_failures_and_listed_passes_are_both_reported(tmp_path: Path) -> None:
    expected = write_expected(tmp_path, "- `Listed fails`: r\n- `Listed passes`: r\n- `Listed skipped`: r\n")
    results = Results([SpecResult("Listed fails", "failed"), SpecResult("Listed passes", "passed"),
                       SpecResult("Listed skipped", "skipped"), SpecResult("New failure", "panicked"),
                       SpecResult("Fine", "passed")])

    unexpected, now_passing = judge(results, expected)

    assert [s.name for s in unexpected] == ["New failure"]
    assert now_passing == ["Listed passes"]  # a skipped spec says nothing either way


def test_the_committed_list_parses_and_names_whole_specs() -> None:
    expected = Expected.load(EXPECTED)
    assert len(expected.entries) >= 1
    assert all(name.startswith("[k8s.io] ") for name in expected.entries)
    assert all(reason for reason in expected.entries.values())
