"""The configuration's sources on pydantic-settings: the TOML file, UNITBOX_*
variables (`__` descends), the command line, their precedence, unknown keys
(strict in the file and flags, ignored in the environment) and bad values,
each error naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from unitbox import config as config_module
from unitbox.config import Config, load_config
from unitbox.errors import ConfigError
from unitbox.limits import Limits

NO_FILE = Path("/dev/null")


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "unitbox.toml"
    path.write_text(text)
    return path


# The file

def test_a_section_in_the_file_sets_its_keys_and_keeps_the_other_defaults(tmp_path: Path) -> None:
    config = load_config(toml(tmp_path, "[limits]\nmemory_mb = 64\n[retention]\nmax_runs = 5\n"), environ={})
    assert config.default_limits == Limits(memory_mb=64)
    assert (config.retention.max_runs, config.retention.max_age_days) == (5, 7.0)
    assert config.maximum_limits == Config().maximum_limits


def test_no_file_named_and_none_at_the_default_path_gives_the_defaults(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(environ={})
    assert config.model_dump() == Config().model_dump()
    assert config.source is None


def test_the_default_path_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", toml(tmp_path, "queue_size = 4\n"))
    config = load_config(environ={})
    assert config.queue_size == 4
    assert config.source == (tmp_path / "unitbox.toml").resolve()


@pytest.mark.parametrize(("make", "problem"), [
    (lambda tmp: toml(tmp, "queue_size = \n"), "line 1"),
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: tmp / "absent.toml", "no such config file"),
])
def test_a_file_that_cannot_be_read_is_an_error_naming_it(tmp_path: Path, make: Any, problem: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(path) in str(caught.value) and problem in str(caught.value)


def test_keys_in_the_file_are_exact(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QUEUE_SIZE: Extra inputs are not permitted"):
        load_config(toml(tmp_path, "QUEUE_SIZE = 5\n"), environ={})
    with pytest.raises(ConfigError, match=r"limits\.Memory_MB"):
        load_config(toml(tmp_path, "[limits]\nMemory_MB = 5\n"), environ={})


# The environment

def test_variables_are_text_parsed_by_the_field_they_set() -> None:
    config = load_config(NO_FILE, environ={
        "UNITBOX_PYTHON": "3", "UNITBOX_WAIT_MAX_S": "1e3", "UNITBOX_LOG_LEVEL": "DEBUG",
        "UNITBOX_LOG_TARGET": "journal", "UNITBOX_STATE_DIR": "/srv/unitbox"})
    assert (config.python, config.wait_max_s, config.log_level) == ("3", 1000.0, "debug")
    assert (config.log_target, config.state_dir) == ("journal", Path("/srv/unitbox"))


def test_a_section_variable_may_be_json_and_nested_variables_merge_into_it() -> None:
    config = load_config(NO_FILE, environ={"UNITBOX_LIMITS": '{"timeout_s": 5, "tasks": 9}',
                                           "UNITBOX_LIMITS__TASKS": "10", "UNITBOX_RETENTION__MAX_RUNS": "3"})
    assert config.default_limits == Limits(timeout_s=5, tasks=10)
    assert config.retention.max_runs == 3


def test_runtimes_come_from_nested_variables_or_json() -> None:
    config = load_config(NO_FILE, environ={"UNITBOX_RUNTIMES__SCI__PYTHON": "/opt/sci/bin/python",
                                           "UNITBOX_RUNTIMES__SCI__PATH": "/opt/sci",
                                           "UNITBOX_RUNTIMES__ML": '{"python": "/opt/ml/bin/python"}'})
    assert {name: (r.python, r.path) for name, r in config.runtimes.items()} == {
        "sci": ("/opt/sci/bin/python", "/opt/sci"), "ml": ("/opt/ml/bin/python", None)}


@pytest.mark.parametrize(("raw", "listen"), [
    ("127.0.0.1:1,unix:/run/u.sock", ["127.0.0.1:1", "unix:/run/u.sock"]),
    ('["[::1]:80"]', ["[::1]:80"]),
    ("", []),
])
def test_listen_is_a_comma_list_or_json(raw: str, listen: list[str]) -> None:
    assert load_config(NO_FILE, environ={"UNITBOX_LISTEN": raw}).listen == listen


def test_only_unitbox_variables_are_read_and_unknown_ones_are_named_in_order() -> None:
    config = load_config(NO_FILE, environ={
        "QUEUE_SIZE": "1", "UNITBOX_ZZZ": "1", "UNITBOX_LIMITS__BOGUS": "1", "UNITBOX_TOKENS__A__B__C": "1",
        "UNITBOX_STATE_DIR__X": "1", "UNITBOX_LISTEN__0": "a:1", "UNITBOX_": "1", "UNITBOX_CONFIG": "",
        "UNITBOX_QUEUE_SIZE": "2"})
    assert config.queue_size == 2
    assert config.listen == ["127.0.0.1:8080"]
    assert config.ignored_env == ("UNITBOX_", "UNITBOX_LIMITS__BOGUS", "UNITBOX_LISTEN__0", "UNITBOX_STATE_DIR__X",
                                  "UNITBOX_TOKENS__A__B__C", "UNITBOX_ZZZ")


def test_load_config_reads_the_process_environment_and_config_alone_reads_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNITBOX_QUEUE_SIZE", "17")
    monkeypatch.setenv("UNITBOX_NOT_A_SETTING", "x")
    assert load_config(NO_FILE).queue_size == 17
    assert "UNITBOX_NOT_A_SETTING" in load_config(NO_FILE).ignored_env
    assert Config().queue_size == 1000


# The command line

def test_flags_left_unset_do_not_override() -> None:
    config = load_config(NO_FILE, environ={"UNITBOX_QUEUE_SIZE": "9", "UNITBOX_SLICE": "env.slice"},
                         cli={"queue_size": None, "slice": "cli.slice", "listen": None})
    assert (config.queue_size, config.slice, config.listen) == (9, "cli.slice", ["127.0.0.1:8080"])


def test_a_flag_for_a_section_merges_with_the_other_sources(tmp_path: Path) -> None:
    config = load_config(toml(tmp_path, "[limits]\ntasks = 20\n"), environ={"UNITBOX_LIMITS__MEMORY_MB": "100"},
                         cli={"limits": {"timeout_s": 2}})
    assert config.default_limits == Limits(timeout_s=2, memory_mb=100, tasks=20)


# Precedence: defaults < file < environment < command line

@pytest.mark.parametrize(("layers", "expected"), [
    ((), 1000), (("file",), 1), (("env",), 2), (("cli",), 3), (("file", "env"), 2), (("file", "cli"), 3),
    (("env", "cli"), 3), (("file", "env", "cli"), 3),
])
def test_each_source_overrides_the_ones_below_it(tmp_path: Path, layers: tuple[str, ...], expected: int) -> None:
    path = toml(tmp_path, "queue_size = 1\n[limits]\ntimeout_s = 1\n") if "file" in layers else NO_FILE
    environ = {"UNITBOX_QUEUE_SIZE": "2", "UNITBOX_LIMITS__TIMEOUT_S": "2"} if "env" in layers else {}
    cli = {"queue_size": 3, "limits": {"timeout_s": 3}} if "cli" in layers else {}
    config = load_config(path, environ=environ, cli=cli)
    assert config.queue_size == expected
    assert config.limits.timeout_s == (expected if layers else Limits().timeout_s)


def test_an_environment_value_can_fix_a_bad_file_value(tmp_path: Path) -> None:
    assert load_config(toml(tmp_path, "queue_size = -1\n"), environ={"UNITBOX_QUEUE_SIZE": "5"}).queue_size == 5


# Bad values

@pytest.mark.parametrize(("environ", "named"), [
    ({"UNITBOX_LIMITS": "{timeout_s: 5}"}, "limits: UNITBOX_LIMITS is not valid JSON"),
    ({"UNITBOX_LISTEN": "[127.0.0.1:1"}, "listen: UNITBOX_LISTEN is not valid JSON"),
    ({"UNITBOX_RUNTIMES__SCI": "python"}, "runtimes.sci: Input should be a valid dictionary"),
    ({"UNITBOX_HEADER_TIMEOUT_S": "inf"}, "header_timeout_s: Input should be a finite number"),
    ({"UNITBOX_LOG_TARGET": "file"}, "log_target: Input should be 'auto', 'journal' or 'stderr'"),
    ({"UNITBOX_TOKENS__CI__ADMIN": "maybe", "UNITBOX_TOKENS__CI__SECRET": "s3cret"}, "tokens.ci.admin"),
])
def test_a_bad_environment_value_names_its_key(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(NO_FILE, environ=environ)
    assert named in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_every_bad_key_is_named_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(toml(tmp_path, "max_request_kb = 0\n"), environ={"UNITBOX_RETENTION__MAX_RUNS": "0"},
                    cli={"slice": "x.service"})
    message = str(caught.value)
    assert str(tmp_path / "unitbox.toml") in message
    for key in ("max_request_kb:", "retention.max_runs:", "slice:"):
        assert key in message


def test_a_json_error_never_shows_a_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(NO_FILE, environ={"UNITBOX_TOKENS": '{"ci": {"secret": "s3cret"'})
    assert "UNITBOX_TOKENS is not valid JSON" in str(caught.value)
    assert "s3cret" not in str(caught.value)
