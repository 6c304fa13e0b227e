"""A run's directories: its inputs are on disk before the run is acknowledged;
what root wrote is read from the broker's part (from the run's own for runs
of 0.1/0.2, whose state directory is moved into the new layout once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unitbox import rundir
from unitbox.config import Config, load_config
from unitbox.rundir import RunDir, prepare_data_dir

RUN = "0123456789abcdef"


def test_create_syncs_every_input_and_every_new_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    run = RunDir(tmp_path / "runs" / RUN, tmp_path / "ends" / RUN)
    run.create(b"print(1)", b"input", ["a"])
    # Each file, then the directories holding the new names, innermost first.
    assert synced == [str(run.script), str(run.inputs / "argv"), str(run.stdin),
                      str(run.inputs), str(run.path), str(run.path.parent)]


def config_in(tmp_path: Path) -> Config:
    return load_config(Path("/dev/null"), environ={}, cli={"state_dir": str(tmp_path / "state")})


def test_what_root_wrote_is_read_from_the_broker_s_part(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    run = RunDir.of(config, RUN)
    run.create(b"print(1)", b"", [])
    assert run.inputs == config.state_dir / "daemon" / "runs" / RUN / "in"
    (config.ends_dir / RUN).mkdir(parents=True)
    (config.ends_dir / RUN / "result").write_text("service_result=success\nexit_code=exited\nexit_status=0\nend=1\n")
    assert run.result == config.ends_dir / RUN / "result" and run.read_outcome() is not None
    run.remove()  # the daemon's part only: the broker's goes by `forget`
    assert not run.path.exists() and run.result.exists()


def test_a_state_dir_of_0_2_is_moved_into_the_new_layout_and_its_runs_stay_readable(tmp_path: Path) -> None:
    config = config_in(tmp_path)
    state = config.state_dir
    (state / "runs" / RUN / "files").mkdir(parents=True)
    (state / "runs" / RUN / "result").write_text("service_result=success\nexit_code=exited\nexit_status=0\nend=1\n")
    (state / "runs" / RUN / "files" / "manifest.json").write_text("{}")
    (state / "unitbox.db").write_bytes(b"db")
    (state / "unitbox.db-wal").write_bytes(b"wal")
    prepare_data_dir(config)
    assert config.database_path.read_bytes() == b"db" and (config.data_dir / "unitbox.db-wal").exists()
    assert not (state / "unitbox.db").exists() and not (state / "runs").exists()
    assert config.data_dir.stat().st_mode & 0o777 == 0o700
    run = RunDir.of(config, RUN)  # no ends directory: it ran under 0.2
    assert run.read_outcome() is not None and run.manifest.read_text() == "{}"
    (config.database_path).write_bytes(b"newer")
    prepare_data_dir(config)  # once: a second start moves nothing
    assert config.database_path.read_bytes() == b"newer"
