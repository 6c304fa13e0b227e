"""The unit profile is pure: its exact output for a known run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Any

from unitbox.dbus_properties import encode_properties
from unitbox.limits import Limits
from unitbox.outcome import parse_result_file
from unitbox.profile import (
    Collector,
    Runtime,
    build_profile,
    build_warm_profile,
    fallback_result,
    hide_state_dir,
    run_id_of,
    stage_dir,
    thread_cap,
    unit_name,
    warm_unit_name,
)
from unitbox.systemd import unit_path
from unitbox.unit_scripts import (
    BOOTSTRAP,
    ON_HOST,
    START_PRE_SCRIPT,
    STOP_POST_SCRIPT,
    WARM_STOP_POST_SCRIPT,
    WARM_STUB,
)

LIMITS = Limits(timeout_s=2.5, memory_mb=128, cpu_percent=50, tasks=32, output_kb=64, disk_mb=16)
COLLECTOR = Collector("/usr/bin/python3", "/usr/lib/unitbox/collect.py", (100, 2, 3, 4, 5, 6, 7))


def profile(runtime: Runtime | None = None, **options: Any) -> dict[str, object]:
    return build_profile("abc123", LIMITS, ends_dir=PurePosixPath("/var/lib/unitbox/ends/abc123"),
                         state_dir=PurePosixPath("/var/lib/unitbox"), slice_name="unitbox.slice",
                         runtime=runtime or Runtime("default", "/usr/bin/python3"), collector=COLLECTOR, **options)


def test_profile_exact_output() -> None:
    assert profile() == {
        "Description": "unitbox run abc123",
        "Slice": "unitbox.slice",
        "Type": "exec",
        "ExecStart": [":/usr/bin/python3", "-I", "-u", "-c", BOOTSTRAP],
        "ExecStartPre": [["+:/usr/bin/nsenter", "--mount=/proc/1/ns/mnt", "--", "/bin/sh", "-c", START_PRE_SCRIPT,
                          "unitbox-start-pre", "/run/unitbox-runs/abc123", "16"]],
        "ExecStopPost": [*ON_HOST, STOP_POST_SCRIPT, "unitbox-stop-post", "/run/unitbox-runs/abc123",
                         "/var/lib/unitbox/ends/abc123", "/usr/bin/python3", "-I", "-S", "/usr/lib/unitbox/collect.py",
                         "100", "2", "3", "4", "5", "6", "7"],
        "KillMode": "control-group",
        "KillSignal": "SIGKILL",
        "OOMPolicy": "kill",
        "CollectMode": "inactive-or-failed",
        "LogExtraFields": ["UNITBOX_RUN_ID=abc123"],
        "WorkingDirectory": "-/run/unitbox/work",
        "Environment": [
            "PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1",
            "HOME=/run/unitbox/work", "TMPDIR=/tmp", "MPLBACKEND=Agg", "MPLCONFIGDIR=/tmp/matplotlib",
            "OMP_NUM_THREADS=1", "OPENBLAS_NUM_THREADS=1", "MKL_NUM_THREADS=1", "NUMEXPR_NUM_THREADS=1",
            "VECLIB_MAXIMUM_THREADS=1", "RAYON_NUM_THREADS=1",
        ],
        "DynamicUser": True,
        "PrivateUsers": True,
        "PrivateNetwork": True,
        "IPAddressDeny": ["any"],
        "RestrictAddressFamilies": ["AF_UNIX"],
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateDevices": True,
        "PrivateIPC": True,
        "PrivateTmp": True,
        "TemporaryFileSystem": ["/run:mode=755", "/var/lib:mode=755"],
        "BindPaths": ["-/run/unitbox-runs/abc123/box/work:/run/unitbox/work",
                      "-/run/unitbox-runs/abc123/box/out:/run/unitbox/out",
                      "-/run/unitbox-runs/abc123/box/tmp:/tmp",
                      "-/run/unitbox-runs/abc123/box/var-tmp:/var/tmp",
                      "-/run/unitbox-runs/abc123/box/shm:/dev/shm"],
        "BindReadOnlyPaths": ["-/run/unitbox-runs/abc123/in:/run/unitbox/code",
                              "-/run/unitbox-runs/abc123/machine-id:/etc/machine-id",
                              "-/run/unitbox-runs/abc123/sys:/sys",
                              "/sys/devices/system/cpu:/sys/devices/system/cpu"],
        "InaccessiblePaths": ["-/etc/unitbox"],
        "ProtectKernelTunables": True,
        "ProtectKernelModules": True,
        "ProtectKernelLogs": True,
        "ProtectControlGroups": True,
        "ProtectClock": True,
        "ProtectHostname": True,
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "NoNewPrivileges": True,
        "CapabilityBoundingSet": [],
        "AmbientCapabilities": [],
        "RestrictSUIDSGID": True,
        "RestrictNamespaces": True,
        "LockPersonality": True,
        "RestrictRealtime": True,
        "KeyringMode": "private",
        "UMask": 0o077,
        "SystemCallArchitectures": ["native"],
        "SystemCallFilter": ["@system-service",
                             "~@privileged @resources @keyring @debug @mount @obsolete @cpu-emulation",
                             "~io_uring_setup io_uring_enter io_uring_register userfaultfd kcmp process_vm_readv "
                             "process_vm_writev"],
        "SystemCallErrorNumber": "EPERM",
        "CPUAccounting": True,
        "MemoryAccounting": True,
        "TasksAccounting": True,
        "CPUQuota": 50,
        "MemoryMax": 128 * 1024 * 1024,
        "MemorySwapMax": 0,
        "TasksMax": 40,
        "RuntimeMaxSec": 2.5,
        "TimeoutStartSec": 30.0,
        "TimeoutStopSec": 30.0,
        "LimitFSIZE": 16 * 1024 * 1024,
        "LimitNOFILE": 1024,
        "LimitCORE": 0,
        "LimitNPROC": 32,
    }


def test_user_input_never_reaches_unit_properties() -> None:
    text = repr(profile())
    for secret in ("print(", "stdin", "argv=["):
        assert secret not in text.replace("argv','rb'", "").replace("sys.argv=[p]", "")


def test_runtime_directory_is_mounted_read_only() -> None:
    props = profile(Runtime("sci", "/var/lib/unitbox/runtimes/sci/bin/python", "/var/lib/unitbox/runtimes/sci"))
    assert props["ExecStart"][0] == ":/var/lib/unitbox/runtimes/sci/bin/python"  # type: ignore[index]
    assert "/var/lib/unitbox/runtimes/sci:/var/lib/unitbox/runtimes/sci" in props["BindReadOnlyPaths"]  # type: ignore[operator]


def test_every_writable_place_is_a_bind_of_the_box_over_a_named_private_tmp() -> None:
    # From systemd 257 DynamicUser= implies PrivateTmp=disconnected unless
    # PrivateTmp= is named, and that bind wins over any TemporaryFileSystem=
    # /tmp; a named PrivateTmp=yes loses to a bind, on 252 and 257 alike.
    props = profile()
    assert props["PrivateTmp"] is True
    assert not [fs for fs in props["TemporaryFileSystem"] if fs.startswith(("/tmp", "/var/tmp", "/dev/shm"))]  # type: ignore[union-attr]
    targets = [bind.split(":")[1] for bind in props["BindPaths"]]  # type: ignore[union-attr]
    assert targets == ["/run/unitbox/work", "/run/unitbox/out", "/tmp", "/var/tmp", "/dev/shm"]
    assert all(bind.startswith("-/run/unitbox-runs/abc123/box/") for bind in props["BindPaths"])  # type: ignore[union-attr]


def test_secret_paths_are_made_inaccessible() -> None:
    props = build_profile("abc123", LIMITS, ends_dir=PurePosixPath("/var/lib/unitbox/ends/abc123"),
                           collector=COLLECTOR,
                          state_dir=PurePosixPath("/var/lib/unitbox"), slice_name="unitbox.slice",
                          runtime=Runtime("default", "/usr/bin/python3"), secret_paths=("/srv/unitbox.toml",))
    assert props["InaccessiblePaths"] == ["-/etc/unitbox", "-/srv/unitbox.toml"]


def test_bind_paths_keep_the_ignore_missing_prefix_as_a_flag() -> None:
    args = encode_properties({"BindPaths": ["-/a:/b", "/c:/d"]})
    entries = [value for _, value in args]
    assert entries[entries.index("/a"):entries.index("/a") + 3] == ["/a", "/b", True]  # "-": ignore if missing
    assert entries[entries.index("/c"):entries.index("/c") + 3] == ["/c", "/d", False]


def test_thread_cap_follows_cpu_and_tasks() -> None:
    assert thread_cap(Limits(cpu_percent=400, tasks=64)) == 4
    assert thread_cap(Limits(cpu_percent=400, tasks=8)) == 2
    assert thread_cap(Limits(cpu_percent=20, tasks=2)) == 1


def test_unit_names_round_trip() -> None:
    assert unit_name("abc") == "unitbox-run-abc.service"
    assert run_id_of("unitbox-run-abc.service") == "abc"
    assert run_id_of("other.service") is None


def test_unit_object_path_escapes_every_non_alphanumeric() -> None:
    assert unit_path("unitbox-run-ab1.service") == "/org/freedesktop/systemd1/unit/unitbox_2drun_2dab1_2eservice"


def test_every_profile_property_has_a_dbus_signature() -> None:
    args = encode_properties(profile())
    names = [value for kind, value in args if kind == ord("s") and isinstance(value, bytes)]
    assert {b"CPUQuotaPerSecUSec", b"RuntimeMaxUSec", b"ExecStopPostEx", b"ExecStartEx"} <= set(names)
    assert names.count(b"SystemCallFilter") == 3


def test_runs_die_by_sigkill_and_the_outcome_recorder_is_not_cut_short() -> None:
    """Finding 10: TimeoutStopSec=1 also bounded the privileged ExecStopPost
    that records the outcome; on a loaded host it ran out and trivial runs
    ended as `error`. Now the run is killed at once (SIGKILL) and the bound
    is the recorder's own."""
    props = profile()
    assert props["KillSignal"] == "SIGKILL"
    assert props["TimeoutStopSec"] >= 30
    assert props["TimeoutStartSec"] >= 30


def test_the_state_dir_is_hidden_without_a_mount_that_names_it() -> None:
    """Finding 4: InaccessiblePaths= on the state dir showed its path in
    /proc/self/mountinfo; an empty tmpfs over its parent leaves no trace."""
    assert hide_state_dir(PurePosixPath("/var/lib/unitbox")) == (["/var/lib:mode=755"], [])
    assert hide_state_dir(PurePosixPath("/srv/unitbox/state")) == (["/srv/unitbox:mode=755"], [])
    assert hide_state_dir(PurePosixPath("/run/unitbox-state")) == ([], [])  # under the run's empty /run already
    assert hide_state_dir(PurePosixPath("/unitbox")) == ([], ["-/unitbox"])  # only / above it: named, but hidden
    assert hide_state_dir(PurePosixPath("/etc/unitbox-state")) == ([], ["-/etc/unitbox-state"])


def test_native_cgroup_privacy_on_new_systemd() -> None:
    props = build_profile("abc123", LIMITS, ends_dir=PurePosixPath("/var/lib/unitbox/ends/abc123"),
                           collector=COLLECTOR,
                          state_dir=PurePosixPath("/var/lib/unitbox"), slice_name="unitbox.slice",
                          runtime=Runtime("default", "/usr/bin/python3"), native_private_cgroups=True)
    assert props["ProtectControlGroupsEx"] == "private" and "ProtectControlGroups" not in props
    assert encode_properties(props)  # it has a D-Bus signature


def _record_outcome(stage: Path, run_dir: Path) -> None:
    env = {"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "7", "PATH": "/usr/bin:/bin"}
    subprocess.run(["/bin/sh", "-c", STOP_POST_SCRIPT, "unitbox-stop-post", str(stage), str(run_dir)],
                   env=env, check=True)


def test_setting_up_then_recording_gives_the_outcome_and_the_runs_own_times(tmp_path: Path) -> None:
    stage, ends = tmp_path / "stage", tmp_path / "ends"
    (stage / "in").mkdir(parents=True)  # the broker staged the inputs (broker/staging.py)
    ends.mkdir()
    before = time.time()
    subprocess.run(["/bin/sh", "-c", START_PRE_SCRIPT, "unitbox-start-pre", str(stage), "16"], check=True)
    try:
        assert len((stage / "machine-id").read_text()) == 33 and (stage / "box" / "work").is_dir()
        assert (stage / "sys" / "fs" / "cgroup").is_dir()
        time.sleep(0.3)  # the program's run
    finally:
        _record_outcome(stage, ends)  # unmounts the box
    result = ends / "result"
    outcome = parse_result_file(result.read_text(), result.stat().st_mtime)
    assert outcome is not None and (outcome.service_result, outcome.exit_status) == ("exit-code", "7")
    assert outcome.started_at is not None and outcome.exited_at is not None
    assert before - 0.5 <= outcome.started_at < outcome.exited_at <= time.time() + 0.5  # /proc/uptime: 10 ms steps
    assert 0.25 <= outcome.exited_at - outcome.started_at <= 2.0
    assert result.stat().st_mode & 0o777 == 0o644  # readable by the daemon's user (ends/ guards it)
    assert not stage.exists() and not Path(f"{stage}.result").exists()


def test_the_outcome_goes_to_run_when_the_run_directory_cannot_take_it(tmp_path: Path) -> None:
    stage, run_dir = tmp_path / "stage", tmp_path / "gone"  # as if the state disk were full
    (stage / "in").mkdir(parents=True)
    _record_outcome(stage, run_dir)
    outcome = parse_result_file(Path(f"{stage}.result").read_text())
    assert outcome is not None and (outcome.exit_code, outcome.exit_status) == ("exited", "7")
    assert fallback_result("0123456789abcdef") == f"{stage_dir('0123456789abcdef')}.result"


def test_a_warm_unit_has_the_run_profile_but_what_depends_on_the_run() -> None:
    common = {"state_dir": PurePosixPath("/var/lib/unitbox"), "slice_name": "unitbox.slice",
              "runtime": Runtime("default", "/usr/bin/python3", stdlib_only=True), "collector": COLLECTOR}
    warm = build_warm_profile("0a1b2c3d4e5f", LIMITS, ends_root=PurePosixPath("/var/lib/unitbox/ends"),
                              lifetime_s=900.0, preload=("numpy",), max_tasks=1024, **common)
    cold = build_profile("warm-0a1b2c3d4e5f", LIMITS, ends_dir=PurePosixPath("/var/lib/unitbox/ends"), **common)
    differing = {key for key in cold if warm.get(key) != cold[key]}
    assert differing == {"Description", "ExecStart", "ExecStopPost", "LogExtraFields", "RuntimeMaxSec", "LimitNPROC"}
    assert warm.keys() == cold.keys()
    assert warm["ExecStart"] == [":/usr/bin/python3", "-I", "-S", "-u", "-c", WARM_STUB + BOOTSTRAP, "numpy"]
    assert warm["ExecStopPost"][len(ON_HOST):len(ON_HOST) + 4] == [
        WARM_STOP_POST_SCRIPT, "unitbox-stop-post", "/run/unitbox-runs/warm-0a1b2c3d4e5f", "/var/lib/unitbox/ends"]
    assert warm["RuntimeMaxSec"] == 900.0 and warm["LimitNPROC"] == 1024
    assert warm_unit_name("0a1b2c3d4e5f") == "unitbox-warm-0a1b2c3d4e5f.service"
    encode_properties(warm)  # every property has its D-Bus signature


def test_the_warm_stop_post_records_nothing_for_a_unit_that_never_had_a_run(tmp_path: Path) -> None:
    stage, ends = tmp_path / "warm-x", tmp_path / "ends"
    (stage / "box").mkdir(parents=True)
    ends.mkdir()
    subprocess.run(["/bin/sh", "-c", WARM_STOP_POST_SCRIPT, "x", str(stage), str(ends), "false"], check=True)
    assert not stage.exists() and list(ends.iterdir()) == []
    (stage / "box").mkdir(parents=True)
    (stage / "run").write_text("0123456789abcdef\n")
    (stage / "timed-out").touch()
    (ends / "0123456789abcdef").mkdir()
    subprocess.run(["/bin/sh", "-c", WARM_STOP_POST_SCRIPT, "x", str(stage), str(ends), "false"], check=True,
                   env={"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"})
    recorded = (ends / "0123456789abcdef" / "result").read_text()
    assert "service_result=timeout\n" in recorded and "exit_code=killed\n" in recorded
