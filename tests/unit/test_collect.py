"""The collector (collect.py) on trees a hostile run could leave: it is run
here directly, as ExecStopPost runs it (by path, `python -I -S`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unitbox import collect
from unitbox.collect import Caps

CAPS = Caps(files=10, file_bytes=1000, total_bytes=2500, depth=2, path_chars=60, entries=500, result_bytes=100)


@pytest.fixture
def box(tmp_path: Path) -> Path:
    for name in ("work", "out"):
        (tmp_path / "box" / name).mkdir(parents=True)
    (tmp_path / "run").mkdir()
    return tmp_path / "box"


def run_collector(box: Path, caps: Caps = CAPS) -> dict[str, object]:
    """collect.py as ExecStopPost runs it; the manifest it wrote."""
    numbers = [str(getattr(caps, name)) for name in Caps.FIELDS]
    subprocess.run([sys.executable, "-I", "-S", collect.__file__, *numbers, str(box), str(box.parent / "run")],
                   check=True, timeout=60)
    manifest: dict[str, object] = json.loads((box.parent / "run" / "files" / "manifest.json").read_text())
    return manifest


def paths(manifest: dict[str, object]) -> list[str]:
    return [f["path"] for f in manifest["files"]]  # type: ignore[attr-defined]


def reasons(manifest: dict[str, object]) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in manifest["skipped"]}  # type: ignore[attr-defined]


def test_regular_files_are_copied_as_numbered_blobs_with_their_digest(box: Path) -> None:
    (box / "work" / "plot.png").write_bytes(b"\x89PNG data")
    (box / "work" / "out").mkdir()
    (box / "work" / "out" / "table.csv").write_text("a,b\n")
    manifest = run_collector(box)
    assert paths(manifest) == ["out/table.csv", "plot.png"]  # sorted: the same run, the same manifest
    first = manifest["files"][1]  # type: ignore[index]
    assert first == {"path": "plot.png", "size": 9, "sha256": hashlib.sha256(b"\x89PNG data").hexdigest(),
                     "blob": "1"}
    assert (box.parent / "run" / "files" / "1").read_bytes() == b"\x89PNG data"
    assert manifest["incomplete"] is False


def test_symlinks_are_never_followed_nor_copied(box: Path, tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:secret")
    (box / "work" / "shadow").symlink_to(secret)
    (box / "work" / "dir").symlink_to(tmp_path)  # a symlinked directory: not descended into
    manifest = run_collector(box)
    assert paths(manifest) == []
    assert reasons(manifest) == {"dir": "symlink: not collected", "shadow": "symlink: not collected"}
    assert all(b"secret" not in p.read_bytes() for p in (box.parent / "run" / "files").iterdir())


def test_a_fifo_is_skipped_without_being_opened(box: Path) -> None:
    os.mkfifo(box / "work" / "fifo")  # opening it for reading would block forever
    began = time.monotonic()
    manifest = run_collector(box)
    assert time.monotonic() - began < 10
    assert reasons(manifest) == {"fifo": "FIFO: not collected"}


def test_a_big_sparse_file_is_skipped_unread(box: Path) -> None:
    with open(box / "work" / "sparse", "wb") as sparse:
        sparse.truncate(2 << 30)  # 2 GiB, no blocks
    began = time.monotonic()
    manifest = run_collector(box)
    assert time.monotonic() - began < 10
    assert paths(manifest) == []
    assert "over the 1000-byte cap per file" in reasons(manifest)["sparse"]


def test_caps_on_count_total_depth_and_path_length(box: Path) -> None:
    work = box / "work"
    for index in range(3):
        (work / f"f{index}").write_bytes(b"x" * 1000)  # the third goes over total_bytes=2500
    deep = work / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "too-deep").write_text("x")
    (work / ("n" * 70)).write_text("x")  # over path_chars=60
    manifest = run_collector(box)
    assert paths(manifest) == ["f0", "f1"]
    skipped = reasons(manifest)
    assert "over the 2500-byte cap for all files" in skipped["f2"]
    assert skipped["a/b/c/"] == "deeper than 2 directories"
    assert "longer than 60 characters" in skipped["n" * 70]


def test_a_flood_of_entries_stops_at_the_entry_cap(box: Path) -> None:
    work = box / "work"
    for index in range(2000):
        (work / f"e{index:05}").touch()
    began = time.monotonic()
    manifest = run_collector(box, Caps(files=5000, file_bytes=10, total_bytes=10, depth=1, path_chars=60,
                                       entries=500, result_bytes=1))
    assert time.monotonic() - began < 20
    assert manifest["incomplete"] is True
    assert len(paths(manifest)) == 500  # the 501st entry looked at is over the cap


def test_the_file_count_cap_stops_the_walk(box: Path) -> None:
    for index in range(20):
        (box / "work" / f"f{index:02}").write_text("x")
    manifest = run_collector(box)
    assert len(paths(manifest)) == CAPS.files
    assert manifest["incomplete"] is True


def test_channels_are_copied_capped_and_only_if_regular(box: Path, tmp_path: Path) -> None:
    out = box / "out"
    (out / "result.json").write_bytes(b"1" * 500)  # over result_bytes=100: cut at cap + 1, the daemon refuses it
    (tmp_path / "secret").write_text("secret")
    (out / "error").symlink_to(tmp_path / "secret")
    run_collector(box)
    run = box.parent / "run"
    assert (run / "return.json").read_bytes() == b"1" * 101
    assert not (run / "return.error").exists()


def test_a_lint_report_taken_before_the_program_ran_is_not_replaced(box: Path) -> None:
    (box.parent / "run" / "lint.json").write_text("[] ")  # moved out by the lint step
    (box / "out" / "lint.json").write_text('[{"forged": true}]')  # written later by the program
    run_collector(box)
    assert (box.parent / "run" / "lint.json").read_text() == "[] "


def test_an_empty_box_leaves_an_empty_manifest(box: Path) -> None:
    assert run_collector(box) == {"files": [], "skipped": [], "skipped_count": 0, "incomplete": False}
