"""What a run leaves, read by the daemon as untrusted bytes: the lint report
(lint.py) and the entrypoint's value and the manifest (leftovers.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from unitbox.leftovers import load_files, media_type, parse_value, read_capped
from unitbox.lint import MAX_DIAGNOSTICS, parse_report, severity_of
from unitbox.rundir import RunDir


def finding(row: int, column: int, code: str | None, message: str = "m") -> dict[str, object]:
    return {"code": code, "location": {"row": row, "column": column}, "message": message}


def test_a_ruff_report_becomes_sorted_diagnostics_with_severities() -> None:
    raw = json.dumps([finding(5, 12, "F821"), finding(1, 8, "F401"), finding(3, 1, None)]).encode()
    report = parse_report(raw, 1 << 20)
    assert [(d.line, d.column, d.code, d.severity) for d in report.diagnostics] == [
        (1, 8, "F401", "warning"), (3, 1, "invalid-syntax", "error"), (5, 12, "F821", "error")]
    assert report.error is None and not report.truncated


@pytest.mark.parametrize(("raw", "error"), [
    (None, "the linter left no report"),
    (b"[" * 100_000, "the linter's report is not valid JSON"),
    (b'[{"code": "F401", "location": {"row": NaN, "column": 1}, "message": "m"}]', "not valid JSON"),
    (b'{"not": "a list"}', "the linter's report is not a list"),
    (b"x" * 2000, "the linter's report is over 1 KiB"),
])
def test_a_broken_report_is_an_error_never_an_exception(raw: bytes | None, error: str) -> None:
    report = parse_report(raw, 1024 if raw and len(raw) == 2000 else 1 << 20)
    assert report.diagnostics == [] and report.error is not None and error in report.error


def test_malformed_findings_are_dropped_and_messages_capped() -> None:
    raw = json.dumps([finding(0, 1, "F1"), finding(1, True, "F2"), {"location": "x"}, "junk",  # type: ignore[arg-type]
                      finding(2, 2, "F3", "y" * 10_000)]).encode()
    report = parse_report(raw, 1 << 20)
    assert [d.code for d in report.diagnostics] == ["F3"]
    assert len(report.diagnostics[0].message) == 500


def test_many_findings_are_truncated() -> None:
    raw = json.dumps([finding(i + 1, 1, "E501") for i in range(MAX_DIAGNOSTICS + 5)]).encode()
    report = parse_report(raw, 1 << 20)
    assert len(report.diagnostics) == MAX_DIAGNOSTICS and report.truncated


def test_severity_codes() -> None:
    assert [severity_of(c) for c in ("E999", "F821", "F632", "F701", "F401", "B006", "E711")] == [
        "error", "error", "error", "error", "warning", "warning", "warning"]


def test_a_value_is_parsed_strictly_and_capped() -> None:
    assert parse_value(b'{"a": [1, 2.5, null]}', 100) == {"a": [1, 2.5, None]}
    for bad in (b"NaN", b"[Infinity]", b"{", b"\xff"):
        with pytest.raises(ValueError, match="not valid JSON"):
            parse_value(bad, 100)
    with pytest.raises(ValueError, match="over the result_kb limit"):
        parse_value(b"1" * 101, 100)


def test_reads_never_follow_symlinks_nor_open_fifos(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("secret")
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    os.mkfifo(tmp_path / "fifo")
    assert read_capped(tmp_path / "link", 100) is None
    assert read_capped(tmp_path / "fifo", 100) is None
    assert read_capped(tmp_path / "secret", 3) == b"sec"


def test_a_manifest_entry_whose_blob_is_a_path_is_ignored(tmp_path: Path) -> None:
    run = RunDir(tmp_path, tmp_path)
    run.files.mkdir()
    entry = {"path": "a.png", "size": 1, "sha256": "0" * 64}
    run.manifest.write_text(json.dumps({"files": [{**entry, "blob": "../../etc/passwd"}, {**entry, "blob": "0"}],
                                        "skipped": [], "skipped_count": 0, "incomplete": False}))
    found = load_files(run)
    assert found is not None and [f.blob for f in found.files] == ["0"]
    assert found.files[0].media_type == "image/png"
    with pytest.raises(ValueError):
        run.blob("../x")


def test_media_types() -> None:
    assert media_type("plot.png") == "image/png"
    assert media_type("data.csv") == "text/csv"
    assert media_type("archive.tar.gz") == "application/octet-stream"  # an encoding: served as bytes
    assert media_type("noext") == "application/octet-stream"
