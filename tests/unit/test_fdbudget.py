"""fdbudget.py: the soft open-file limit is raised to what the configuration
needs, and a configuration the hard limit cannot hold stops the daemon with
a message naming the keys."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from unitbox.config import Config, load_config
from unitbox.errors import ConfigError
from unitbox.fdbudget import ensure_fd_budget, required_fds


def config(**values: object) -> Config:
    return load_config(Path("/dev/null"), environ={}, cli={"max_concurrent": 4, **values})


class Limits:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        monkeypatch.setattr(resource, "getrlimit", lambda _: (self.soft, self.hard))
        monkeypatch.setattr(resource, "setrlimit", self.set)

    def set(self, _: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.soft, self.hard = limits


def test_the_defaults_need_more_than_the_kernels_default_soft_limit() -> None:
    assert required_fds(config()) > 1024 + 1000  # a full queue of held requests alone is over 1024


def test_a_low_soft_limit_is_raised_to_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = Limits(monkeypatch, 1024, 524288)
    assert ensure_fd_budget(config()) == required_fds(config()) == limits.soft
    assert limits.hard == 524288


def test_a_sufficient_soft_limit_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = Limits(monkeypatch, 16384, 16384, refuse=True)  # as under unitbox.service
    assert ensure_fd_budget(config()) == 16384 == limits.soft


def test_a_budget_over_the_hard_limit_refuses_to_start_naming_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    Limits(monkeypatch, 1024, 4096)
    with pytest.raises(ConfigError, match=r"needs \d+ file descriptors.*max_connections \(9000\).*max_concurrent "
                                          r"\(4\).*hard limit is 4096.*LimitNOFILE"):
        ensure_fd_budget(config(max_connections=9000, max_connections_per_client=100))


def test_a_limit_that_cannot_be_raised_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    Limits(monkeypatch, 1024, 524288, refuse=True)  # setrlimit filtered (SystemCallFilter=~@resources)
    with pytest.raises(ConfigError, match=r"soft limit is 1024 and raising it failed.*LimitNOFILE"):
        ensure_fd_budget(config())


def test_the_shipped_unit_holds_the_defaults_on_a_large_machine() -> None:
    unit = (Path(__file__).resolve().parents[2] / "units" / "unitbox.service").read_text()
    limit = int(next(line for line in unit.splitlines() if line.startswith("LimitNOFILE=")).split("=")[1])
    assert required_fds(config(max_concurrent=256)) <= limit


def test_per_client_cap_above_total_is_a_config_error_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"max_connections_per_client \(50\) is above max_connections \(10\)"):
        config(max_connections=10, max_connections_per_client=50)
