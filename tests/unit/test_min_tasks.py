"""`tasks` below what systemd needs to start a run (2, measured on systemd
252: with 1 the unit fails with 217/USER before the program runs) is refused:
by a submission (422 naming the field and the minimum) and by the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from unitbox.config import load_config
from unitbox.errors import ConfigError, InvalidLimits
from unitbox.limits import MIN_TASKS, Limits, default_maxima, resolve_limits


def test_tasks_below_the_minimum_is_refused_naming_field_and_minimum() -> None:
    assert MIN_TASKS == 2
    for value in (1, 1.0, 1.5):
        with pytest.raises(InvalidLimits) as caught:
            resolve_limits({"tasks": value}, Limits(), default_maxima())
        assert caught.value.field == "tasks" and "at least 2" in caught.value.message
    assert resolve_limits({"tasks": 2}, Limits(), default_maxima()).tasks == 2


@pytest.mark.parametrize("section", ["limits", "max_limits"])
def test_the_config_cannot_default_or_cap_tasks_below_the_minimum(tmp_path: Path, section: str) -> None:
    path = tmp_path / "unitbox.toml"
    path.write_text("[limits]\ntasks = 2\n[max_limits]\ntasks = 1\n" if section == "max_limits"
                    else "[limits]\ntasks = 1\n")
    with pytest.raises(ConfigError, match=rf"{section}\.tasks: Input should be greater than or equal to 2"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match=rf"{section}\.tasks"):
        load_config(Path("/dev/null"), environ={f"UNITBOX_{section.upper()}__TASKS": "1"})
