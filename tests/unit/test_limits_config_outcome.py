from __future__ import annotations

import math
from pathlib import Path

import pytest

from unitbox.config import load_config, parse_listen
from unitbox.errors import ConfigError, InvalidLimits
from unitbox.limits import Limits, resolve_limits
from unitbox.outcome import Outcome, RunState, classify, parse_result_file

MAX = Limits(timeout_s=60, memory_mb=1024, cpu_percent=200, tasks=128, output_kb=4096, disk_mb=512)


def test_missing_limits_take_defaults() -> None:
    assert resolve_limits({"timeout_s": 3}, Limits(), MAX) == Limits(timeout_s=3.0)
    assert resolve_limits(None, Limits(), MAX) == Limits()


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("timeout_s", 0, "greater than 0"), ("memory_mb", -5, "greater than 0"), ("tasks", 129, "at most 128"),
    ("timeout_s", math.nan, "finite"), ("timeout_s", math.inf, "finite"), ("tasks", "8", "number"),
    ("tasks", True, "number"), ("disk_mb", 1.5, "whole number"), ("bogus", 1, "not a known limit"),
])
def test_bad_limits_name_the_field_and_never_clamp(field: str, value: object, problem: str) -> None:
    with pytest.raises(InvalidLimits) as caught:
        resolve_limits({field: value}, Limits(), MAX)
    assert caught.value.field == field
    assert problem in caught.value.message


def test_config_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "unitbox.toml"
    path.write_text('state_dir = "/file"\nqueue_size = 5\nmax_concurrent = 3\n[limits]\ntimeout_s = 7\n')
    config = load_config(path, environ={"UNITBOX_QUEUE_SIZE": "9", "UNITBOX_MAX_CONCURRENT": "4",
                                        "UNITBOX_LIMITS__MEMORY_MB": "100"}, cli={"max_concurrent": 6})
    assert str(config.state_dir) == "/file"
    assert config.queue_size == 9
    assert config.max_concurrent == 6
    assert config.default_limits == Limits(timeout_s=7, memory_mb=100)


def test_config_defaults_need_no_file() -> None:
    config = load_config(Path("/dev/null"), environ={})
    assert config.listen == ["127.0.0.1:8080"]
    assert config.queue_size == 1000
    assert str(config.state_dir) == "/var/lib/unitbox"


@pytest.mark.parametrize(("text", "key"), [
    ("queue_size = -1", "queue_size"), ("bogus = 1", "bogus"), ('listen = ["nowhere"]', "listen"),
    ("[limits]\ntimeout_s = 0", "limits.timeout_s"), ("[limits]\ntasks = 100000", "max_limits.tasks"),
    ('slice = "x.service"', "slice"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "unitbox.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert key in str(caught.value)


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.toml", environ={})


def test_env_overrides_parse_lists_and_sections() -> None:
    config = load_config(Path("/dev/null"), environ={"UNITBOX_LISTEN": "127.0.0.1:1, unix:/run/u.sock",
                                                     "UNITBOX_LIMITS__TASKS": "8", "OTHER": "x"})
    assert config.listen == ["127.0.0.1:1", "unix:/run/u.sock"]
    assert config.default_limits == Limits(tasks=8)
    assert config.ignored_env == ()


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("unix:/run/unitbox.sock") == "/run/unitbox.sock"
    with pytest.raises(ValueError):
        parse_listen("unix:relative")


def outcome(result: str, code: str, status: str, oom: int = 0) -> Outcome:
    return Outcome(service_result=result, exit_code=code, exit_status=status, oom_kills=oom)


@pytest.mark.parametrize(("o", "cancelled", "ran", "state", "exit_code", "signal"), [
    (outcome("success", "exited", "0"), False, True, RunState.SUCCEEDED, 0, None),
    (outcome("exit-code", "exited", "3"), False, True, RunState.FAILED, 3, None),
    (outcome("signal", "killed", "SEGV"), False, True, RunState.FAILED, None, "SIGSEGV"),
    (outcome("timeout", "killed", "TERM"), False, True, RunState.TIMED_OUT, None, "SIGTERM"),
    (outcome("oom-kill", "killed", "KILL"), False, True, RunState.OOM_KILLED, None, "SIGKILL"),
    (outcome("signal", "killed", "KILL", oom=1), False, True, RunState.OOM_KILLED, None, "SIGKILL"),
    (outcome("signal", "killed", "TERM"), True, True, RunState.CANCELLED, None, "SIGTERM"),
    (outcome("exit-code", "exited", "226"), False, False, RunState.ERROR, None, None),
    (outcome("resources", "", ""), False, False, RunState.ERROR, None, None),
    (outcome("exit-code", "exited", "226"), False, True, RunState.FAILED, 226, None),
])
def test_classify(o: Outcome, cancelled: bool, ran: bool, state: RunState, exit_code: int | None,
                  signal: str | None) -> None:
    verdict = classify(o, cancelled=cancelled, ran=ran)
    assert (verdict.state, verdict.exit_code, verdict.signal) == (state, exit_code, signal)


def test_result_file_parsing() -> None:
    text = ("service_result=success\nexit_code=exited\nexit_status=0\ncpu_ns=123\nmemory_peak=\n"
            "oom_kill=0\nend=1\n")
    assert parse_result_file(text) == Outcome("success", "exited", "0", 123, None, 0)
    assert parse_result_file(text.replace("end=1\n", "")) is None


def test_the_recorders_uptime_readings_become_wall_clock_times() -> None:
    text = ("service_result=success\nexit_code=exited\nexit_status=0\nstarted_uptime=100.00\n"
            "exited_uptime=102.50\nwritten_uptime=102.60\nend=1\n")
    outcome = parse_result_file(text, written_at=1000.0)
    assert outcome is not None and outcome.exited_at is not None and outcome.started_at is not None
    assert (round(outcome.started_at, 6), round(outcome.exited_at, 6)) == (997.4, 999.9)
    no_clock = parse_result_file(text)  # without the file's mtime there is no wall clock
    assert no_clock is not None and (no_clock.started_at, no_clock.exited_at) == (None, None)
    for bad in ("started_uptime=\n", "started_uptime=nan\n", "started_uptime=103\n"):  # staged nothing; junk
        odd = parse_result_file(text.replace("started_uptime=100.00\n", bad), written_at=1000.0)
        assert odd is not None and odd.started_at is None and odd.exited_at is not None


def test_unit_end_from_signal_properties() -> None:
    from unitbox.systemd import UnitEnd, end_from_service

    assert end_from_service({"Result": "exit-code", "ExecMainCode": 1, "ExecMainStatus": 6}) == \
        UnitEnd("exit-code", "exited", "6", None, None)
    killed = end_from_service({"Result": "signal", "ExecMainCode": 2, "ExecMainStatus": 9,
                               "ExecMainStartTimestamp": 2_000_000, "ExecMainExitTimestamp": 3_500_000})
    assert (killed.exit_code, killed.exit_status, killed.started_at, killed.exited_at) == ("killed", "9", 2.0, 3.5)
    assert classify(Outcome(killed.result, killed.exit_code, killed.exit_status), cancelled=False,
                    ran=True).signal == "SIGKILL"
    assert end_from_service({"Result": "success", "ExecMainCode": 0, "ExecMainStatus": 0}).exit_code == ""
    assert end_from_service({}) == UnitEnd("", "", "", None, None)


def test_timeout_of_a_leftover_process_stop_is_not_a_run_timeout() -> None:
    stop_timed_out = outcome("timeout", "exited", "0")
    assert classify(stop_timed_out, cancelled=False, ran=True, exited_in_time=True).state is RunState.SUCCEEDED
    assert classify(stop_timed_out, cancelled=False, ran=True, exited_in_time=False).state is RunState.TIMED_OUT
    killed_at_deadline = outcome("timeout", "killed", "TERM")
    assert classify(killed_at_deadline, cancelled=False, ran=True, exited_in_time=True).state is RunState.TIMED_OUT


def test_config_remembers_its_source(tmp_path: Path) -> None:
    path = tmp_path / "u.toml"
    path.write_text("queue_size = 3\n")
    assert load_config(path, environ={}).source == path.resolve()
    assert load_config(Path("/dev/null"), environ={}).source is None


def test_systemd_major_version() -> None:
    from unitbox.broker.server import systemd_major

    assert systemd_major("252.39-1~deb12u2") == 252
    assert systemd_major("257") == 257
    assert systemd_major("unknown") == 0


def test_a_runs_times_come_from_its_recorder_before_the_signals_or_the_daemons_clock(tmp_path: Path) -> None:
    from unitbox.lifecycle import RunLife, StoredStreams, conclude
    from unitbox.rundir import RunDir
    from unitbox.store import RunRecord
    from unitbox.systemd import UNKNOWN_END

    record = RunRecord(id="0123456789abcdef", state=RunState.RUNNING, created_at=990.0, limits=Limits(),
                       started_at=998.7)  # when the daemon heard "active": late
    run = RunLife(record, RunDir(tmp_path, tmp_path))
    run.end = UNKNOWN_END  # UnitRemoved says nothing of times
    recorded = Outcome("success", "exited", "0", started_at=997.4, exited_at=999.9)
    final = conclude(run, (recorded, 1000.0), StoredStreams(), now=1001.0)
    assert (final.state, final.started_at, final.duration_ms) == (RunState.SUCCEEDED, 997.4, 2500.0)
    run.cancel_at = 999.95  # asked after the program had exited by itself: not a cancel
    assert conclude(run, (recorded, 1000.0), StoredStreams(), now=1001.0).state is RunState.SUCCEEDED
