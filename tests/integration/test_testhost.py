"""The test host shares the machine politely: it removes only what it made,
and the leftover check of a test run looks only at that run's hosts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.testhost import CHECK_CLEAN, RUN_TAG, SCRATCH, TestHost, unique_name


def test_a_folder_named_like_a_host_survives_the_hosts_boot_and_stop() -> None:
    name = unique_name("namesake")
    folder = Path("/var/tmp") / name
    folder.mkdir()
    (folder / "keep.txt").write_text("not the test host's\n")
    try:
        host = TestHost.boot(name)
        try:
            assert (SCRATCH / name / "root").is_mount()
            assert host.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded")
        finally:
            host.stop()
        assert not (SCRATCH / name).exists()
        assert (folder / "keep.txt").read_text() == "not the test host's\n"
    finally:
        shutil.rmtree(folder)


def check_clean(tag: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CHECK_CLEAN)], env={**os.environ, "UBX_TEST_RUN": tag},
                          capture_output=True, text=True, check=False, timeout=60)


def test_the_leftover_check_sees_only_its_own_runs_hosts() -> None:
    other = f"{RUN_TAG}other"
    host = TestHost.boot(f"ubx-{other}-foreign-1")
    try:
        mine = check_clean(f"{RUN_TAG}none")
        assert mine.returncode == 0, mine.stdout
        theirs = check_clean(other)
        assert theirs.returncode == 1
        assert f"/var/tmp/unitbox-testhost/ubx-{other}-foreign-1/root" in theirs.stdout
    finally:
        host.stop()
    assert check_clean(other).returncode == 0
