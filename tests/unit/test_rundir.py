"""A run's directory: its inputs are on disk before the run is acknowledged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unitbox import rundir
from unitbox.rundir import RunDir


def test_create_syncs_every_input_and_every_new_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    run = RunDir(tmp_path / "runs" / "0123456789abcdef")
    run.create(b"print(1)", b"input", ["a"])
    # Each file, then the directories holding the new names, innermost first.
    assert synced == [str(run.script), str(run.inputs / "argv"), str(run.stdin),
                      str(run.inputs), str(run.path), str(run.path.parent)]
