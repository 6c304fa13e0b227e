"""UNITBOX_* variables map onto known settings only: an unknown one is
ignored and named in a warning, while the file and the flags stay strict."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from unitbox import cli
from unitbox.config import load_config
from unitbox.errors import ConfigError

NO_FILE = Path("/dev/null")


def test_an_unknown_variable_is_ignored_and_named_in_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("UNITBOX_TEST_HOST", "x")
    monkeypatch.setenv("UNITBOX_LIMITS__BOGUS", "1")
    monkeypatch.setattr(cli, "setup_logging", lambda *_: None)  # keep caplog's handler
    with caplog.at_level(logging.WARNING, logger="unitbox.cli"):
        assert cli.main(["--config", str(NO_FILE), "check-config"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "unitbox.cli"]
    assert any("UNITBOX_TEST_HOST" in message for message in warned)
    assert any("UNITBOX_LIMITS__BOGUS" in message for message in warned)


def test_a_known_nested_variable_still_applies() -> None:
    config = load_config(NO_FILE, environ={"UNITBOX_LIMITS__TIMEOUT_S": "5", "UNITBOX_TEST_HOST": "x",
                                           "UNITBOX_RETENTION__MAX_RUNS": "3"})
    assert config.limits.timeout_s == 5
    assert config.retention.max_runs == 3
    assert config.ignored_env == ("UNITBOX_TEST_HOST",)


@pytest.mark.parametrize(("name", "value", "key"), [
    ("UNITBOX_QUEUE_SIZE", "-1", "queue_size"), ("UNITBOX_LIMITS__TIMEOUT_S", "soon", "limits.timeout_s"),
])
def test_a_bad_value_in_a_known_variable_is_an_error_naming_its_key(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(NO_FILE, environ={name: value, "UNITBOX_TEST_HOST": "x"})
    assert key in str(caught.value)
    assert "test_host" not in str(caught.value).lower()


def test_unitbox_config_names_the_file_and_is_no_setting(tmp_path: Path) -> None:
    path = tmp_path / "unitbox.toml"
    path.write_text("queue_size = 5\n")
    config = load_config(environ={"UNITBOX_CONFIG": str(path), "UNITBOX_TEST_HOST": "x"})
    assert config.queue_size == 5
    assert config.source == path.resolve()
    assert config.ignored_env == ("UNITBOX_TEST_HOST",)


def test_unknown_keys_in_the_file_and_flags_stay_errors(tmp_path: Path) -> None:
    path = tmp_path / "unitbox.toml"
    path.write_text("test_host = 1\n")
    with pytest.raises(ConfigError, match="test_host"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="test_host"):
        load_config(NO_FILE, environ={}, cli={"test_host": "x"})
