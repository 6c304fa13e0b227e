"""The OOM watch on a fake cgroup tree: where the counters are on v1 and v2,
and a run is stopped once, at its first OOM kill, and only while watched."""

from __future__ import annotations

import asyncio
from pathlib import Path

from unitbox.oomwatch import OomWatch, counter_file, read_oom_kills, slice_path

V1_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {}\n"
V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill {}\noom_group_kill 0\n"


def test_slice_paths_follow_systemds_dashes() -> None:
    assert slice_path("unitbox.slice") == "/unitbox.slice"
    assert slice_path("a-b-c.slice") == "/a.slice/a-b.slice/a-b-c.slice"
    assert slice_path("-.slice") == ""


def v1_tree(root: Path) -> Path:
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.oom_control").write_text(V1_CONTROL.format(0))
    run = root / "memory" / "unitbox.slice" / "unitbox-run-0123456789abcdef.service"
    run.mkdir(parents=True)
    (run / "memory.oom_control").write_text(V1_CONTROL.format(0))
    return run / "memory.oom_control"


def test_counter_files_on_v1_and_v2(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    control = v1_tree(v1)
    where = counter_file(v1, "unitbox.slice")
    assert where is not None and where("unitbox-run-0123456789abcdef.service") == control
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    where = counter_file(v2, "unitbox.slice")
    assert where is not None
    assert where("unitbox-run-0123456789abcdef.service") == v2 / "unitbox.slice" / "unitbox-run-0123456789abcdef.service" / "memory.events"
    assert counter_file(tmp_path / "nothing", "unitbox.slice") is None


def test_reading_the_count(tmp_path: Path) -> None:
    path = tmp_path / "memory.events"
    path.write_text(V2_EVENTS.format(7))
    assert read_oom_kills(path) == 7  # not `oom` (3), not `oom_group_kill`
    assert read_oom_kills(tmp_path / "gone") == 0


async def test_a_run_is_stopped_once_at_its_first_oom_kill(tmp_path: Path) -> None:
    control = v1_tree(tmp_path)
    stopped: list[str] = []
    watch = OomWatch("unitbox.slice", stopped.append, root=tmp_path, interval_s=0.01)
    try:
        watch.watch("0123456789abcdef")
        watch.watch("fedcba9876543210")  # no cgroup (yet): counts as no kill
        await asyncio.sleep(0.05)
        assert stopped == []
        control.write_text(V1_CONTROL.format(1))
        await asyncio.sleep(0.05)
        assert stopped == ["0123456789abcdef"]
        control.write_text(V1_CONTROL.format(5))
        await asyncio.sleep(0.05)
        assert stopped == ["0123456789abcdef"]  # once
    finally:
        watch.close()


async def test_a_forgotten_run_is_not_stopped(tmp_path: Path) -> None:
    control = v1_tree(tmp_path)
    stopped: list[str] = []
    watch = OomWatch("unitbox.slice", stopped.append, root=tmp_path, interval_s=0.01)
    try:
        watch.watch("0123456789abcdef")
        watch.forget("0123456789abcdef")  # it ended
        control.write_text(V1_CONTROL.format(1))
        await asyncio.sleep(0.05)
        assert stopped == []
    finally:
        watch.close()
