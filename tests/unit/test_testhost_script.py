"""tests/testhost/testhost.sh removes only what it made: stop, gc and a refused
start on a private scratch tree (no boot, no root; booting is in
tests/integration/test_testhost.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.testhost import NAME_TAKEN, SCRIPT

MARKER = ".unitbox-testhost"


class Tree:
    """A scratch root and a run dir of the script's own, under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.scratch = root / "scratch"
        self.rundir = root / "run"
        self.scratch.mkdir()
        self.rundir.mkdir()
        # Should the script ever get past a check it must fail, it still cannot mount or boot here.
        self.bin = root / "bin"
        self.bin.mkdir()
        for tool in ("mount", "unshare"):
            (self.bin / tool).write_text("#!/bin/sh\necho 'no mounts or boots in the unit tier' >&2\nexit 99\n")
            (self.bin / tool).chmod(0o755)

    def script(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}",
               "UNITBOX_TESTHOST_SCRATCH": str(self.scratch), "UNITBOX_TESTHOST_RUNDIR": str(self.rundir)}
        return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                              check=False, timeout=60)

    def folder(self, name: str, marked: bool) -> Path:
        """A scratch dir with a file in it: one the script made (marked) or a foreign one."""
        base = self.scratch / name
        base.mkdir()
        (base / "keep.txt").write_text("someone's work\n")
        if marked:
            (base / MARKER).write_text(f"{name}\n")
        return base

    def owned_by(self, name: str, pid: int) -> None:
        (self.rundir / f"{name}.owner").write_text(f"{pid}\n")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stop_leaves_a_dir_it_did_not_make(tree: Tree) -> None:
    foreign = tree.folder("ubx-x-projects-1", marked=False)
    done = tree.script("stop", "ubx-x-projects-1")
    assert done.returncode == 0, done.stderr
    assert (foreign / "keep.txt").read_text() == "someone's work\n"
    assert "left" in done.stderr


def test_stop_removes_the_scratch_dir_it_made_and_its_files(tree: Tree) -> None:
    made = tree.folder("ubx-x-it-1", marked=True)
    tree.owned_by("ubx-x-it-1", os.getpid())
    (tree.rundir / "ubx-x-it-1.pid").write_text(f"{dead_pid()}\n")
    done = tree.script("stop", "ubx-x-it-1")
    assert done.returncode == 0, done.stderr
    assert not made.exists()
    assert list(tree.rundir.iterdir()) == []


def test_stop_spares_a_process_that_reuses_a_stale_hosts_pid(tree: Tree) -> None:
    tree.folder("ubx-x-reused-1", marked=True)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (tree.rundir / "ubx-x-reused-1.pid").write_text(f"{bystander.pid}\n")
        done = tree.script("stop", "ubx-x-reused-1")
        assert done.returncode == 0, done.stderr
        assert bystander.poll() is None, "stop killed a process outside the host's cgroup"
    finally:
        bystander.kill()
        bystander.wait()


def test_gc_reaps_only_hosts_it_made_whose_owner_is_gone(tree: Tree) -> None:
    stale = tree.folder("ubx-x-stale-1", marked=True)
    tree.owned_by("ubx-x-stale-1", dead_pid())
    alive = tree.folder("ubx-x-alive-1", marked=True)
    tree.owned_by("ubx-x-alive-1", os.getpid())
    foreign = tree.folder("ubx-x-foreign-1", marked=False)
    tree.owned_by("ubx-x-foreign-1", dead_pid())

    done = tree.script("gc")

    assert done.returncode == 0, done.stderr
    assert not stale.exists()
    assert not (tree.rundir / "ubx-x-stale-1.owner").exists()
    assert (alive / "keep.txt").exists()
    assert (foreign / "keep.txt").exists()
    assert (tree.rundir / "ubx-x-foreign-1.owner").exists(), "gc must not touch what it did not make"


def test_start_refuses_a_name_whose_dir_exists_and_leaves_it(tree: Tree) -> None:
    foreign = tree.folder("ubx-x-taken-1", marked=False)
    done = tree.script("start", "ubx-x-taken-1")
    assert done.returncode == NAME_TAKEN, done.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    assert list(tree.rundir.iterdir()) == []


def test_start_refuses_a_symlinked_scratch_root(tree: Tree, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tree.scratch.rmdir()
    tree.scratch.symlink_to(elsewhere)
    done = tree.script("start", "ubx-x-link-1")
    assert done.returncode == NAME_TAKEN, done.stderr
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("name", ["../victim", "a/b", ".victim", "-rf", "x" * 64])
def test_a_name_that_is_not_a_plain_word_is_refused(tree: Tree, tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    (victim / MARKER).write_text("planted")  # even a marked dir outside the scratch root stays
    for command in ("start", "stop"):
        done = tree.script(command, name)
        assert done.returncode == 2, (command, done.stderr)
    assert (victim / "keep.txt").exists()
    assert list(tree.scratch.iterdir()) == []
