"""Typed configuration: defaults < /etc/unitbox/unitbox.toml < UNITBOX_*
environment < command-line flags, validated once at startup with messages
that name the offending key. Needs no file at all for the defaults to work.
An unknown key in the file or the flags is an error; an unknown UNITBOX_*
variable is ignored and named in a warning (the environment is shared)."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from unitbox.errors import ConfigError
from unitbox.limits import MIN_TASKS, Limits, default_maxima
from unitbox.tokens import TokenSection, check_tokens, tokens_from_list

DEFAULT_CONFIG_PATH = Path("/etc/unitbox/unitbox.toml")
ENV_PREFIX = "UNITBOX_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsSection(_Section):
    timeout_s: float = Field(gt=0, allow_inf_nan=False)
    memory_mb: int = Field(gt=0)
    cpu_percent: int = Field(gt=0)
    tasks: int = Field(ge=MIN_TASKS)  # fewer: systemd cannot start the unit (limits.py)
    output_kb: int = Field(gt=0)
    disk_mb: int = Field(gt=0)

    def to_limits(self) -> Limits:
        return Limits(**self.model_dump())


def _limits_default(limits: Limits) -> dict[str, Any]:
    return limits.as_dict()


class RetentionSection(_Section):
    max_age_days: float = Field(default=7.0, gt=0)
    max_runs: int = Field(default=10_000, gt=0)
    max_total_mb: int = Field(default=1024, gt=0)
    interval_s: float = Field(default=300.0, gt=0)
    # The disk budget (budget.py): past high water retention sweeps at once,
    # and every sweep deletes down to low water; below min_free_mb free on the
    # state filesystem, submissions are refused and output is dropped.
    high_water_percent: int = Field(default=90, gt=0, le=100)
    low_water_percent: int = Field(default=75, gt=0, le=100)
    min_free_mb: int = Field(default=512, ge=0)

    @model_validator(mode="after")
    def _low_below_high(self) -> RetentionSection:
        if self.low_water_percent > self.high_water_percent:
            raise ValueError(f"low_water_percent ({self.low_water_percent}) is above "
                             f"high_water_percent ({self.high_water_percent})")
        return self


class RuntimeSection(_Section):
    python: str
    """Interpreter inside the runtime, as runs see it."""
    path: str | None = None
    """Directory bind-mounted read-only into runs (a venv); None for the host's Python."""


class Config(_Section):
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:8080"])
    tokens: dict[str, TokenSection] = Field(default_factory=dict)
    state_dir: Path = Path("/var/lib/unitbox")
    slice: str = "unitbox.slice"
    python: str = "/usr/bin/python3"
    max_concurrent: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)
    queue_size: int = Field(default=1000, ge=0)
    max_request_kb: int = Field(default=1024, gt=0)
    wait_max_s: float = Field(default=300.0, gt=0)
    # The HTTP side under hostile clients (api/guard.py, fdbudget.py): every
    # connection costs a file descriptor, so their number and life are bounded.
    max_connections: int = Field(default=2048, gt=0)
    max_connections_per_client: int = Field(default=1024, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600, allow_inf_nan=False)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=15)  # + HTTP's 3 s, inside TimeoutStopSec=30
    log_level: str = "info"
    log_target: Literal["auto", "journal", "stderr"] = "auto"
    limits: LimitsSection = Field(default_factory=lambda: LimitsSection(**_limits_default(Limits())))
    max_limits: LimitsSection = Field(default_factory=lambda: LimitsSection(**_limits_default(default_maxima())))
    retention: RetentionSection = Field(default_factory=RetentionSection)
    runtimes: dict[str, RuntimeSection] = Field(default_factory=dict)
    _source: Path | None = PrivateAttr(default=None)
    _ignored_env: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("listen")
    @classmethod
    def _listen_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            parse_listen(address)
        return value

    _tokens_from_list = field_validator("tokens", mode="before")(tokens_from_list)

    @field_validator("tokens")
    @classmethod
    def _token_names(cls, value: dict[str, TokenSection]) -> dict[str, TokenSection]:
        check_tokens(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @field_validator("slice")
    @classmethod
    def _slice_name(cls, value: str) -> str:
        if not value.endswith(".slice") or "/" in value:
            raise ValueError("must be a unit name ending in .slice")
        return value

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> Config:
        for name, value in self.limits.model_dump().items():
            if value > getattr(self.max_limits, name):
                raise ValueError(f"limits.{name} ({value}) is above max_limits.{name}")
        if "default" in self.runtimes:
            raise ValueError("runtimes.default is built in and cannot be redefined")
        return self

    @model_validator(mode="after")
    def _per_client_within_total(self) -> Config:
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(f"max_connections_per_client ({self.max_connections_per_client}) is above "
                             f"max_connections ({self.max_connections})")
        return self

    @property
    def source(self) -> Path | None:
        """The config file this was read from, if any (runs must not see it)."""
        return self._source

    @property
    def ignored_env(self) -> tuple[str, ...]:
        """UNITBOX_* environment variables that name no setting (to warn about once logging is up)."""
        return self._ignored_env

    @property
    def default_limits(self) -> Limits:
        return self.limits.to_limits()

    @property
    def maximum_limits(self) -> Limits:
        return self.max_limits.to_limits()

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "unitbox.db"


def parse_listen(address: str) -> tuple[str, int] | str:
    """`host:port` → (host, port); `unix:/path` → "/path"."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{address!r}: a unix socket path must be absolute")
        return path
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port or unix:/path")
    return host.strip("[]") or "127.0.0.1", int(port)


def _env_value(raw: str, key: str) -> Any:
    if key in {"listen", "tokens"} and not raw.lstrip().startswith(("[", "{")):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if key == "secret":  # a token's secret is text as given, even "123" or "true"
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _is_known_key(path: list[str]) -> bool:
    """Whether a lowercased, split variable name is a key of Config: a field,
    a field of a section (limits__timeout_s), or runtimes__NAME[__field]."""
    head, *rest = path
    field = Config.model_fields.get(head)
    if field is None:
        return False
    if not rest:
        return True
    if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
        return len(rest) == 1 and rest[0] in field.annotation.model_fields
    if head == "runtimes" and rest[0]:
        return len(rest) == 1 or (len(rest) == 2 and rest[1] in RuntimeSection.model_fields)
    if head == "tokens" and rest[0]:  # UNITBOX_TOKENS__NAME__SECRET, …__ADMIN
        return len(rest) == 2 and rest[1] in TokenSection.model_fields
    return False


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """UNITBOX_STATE_DIR=… → {"state_dir": …}; UNITBOX_LIMITS__TIMEOUT_S=5 →
    {"limits": {"timeout_s": 5}} (a double underscore descends a section).
    Also returns the names of UNITBOX_* variables that are no key of Config:
    those are ignored, since the environment holds more than our settings
    (a test harness's UNITBOX_TEST_HOST must not stop the daemon)."""
    result: dict[str, Any] = {}
    ignored = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "UNITBOX_CONFIG":
            continue
        path = name.removeprefix(ENV_PREFIX).lower().split("__")
        if not _is_known_key(path):
            ignored.append(name)
            continue
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _env_value(raw, path[-1])
    return result, ignored


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path, required: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such config file") from None
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{key}: {error['msg']}")
    return f"invalid configuration ({source}): " + "; ".join(problems)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None,
                cli: Mapping[str, Any] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    explicit = path or (Path(environ["UNITBOX_CONFIG"]) if environ.get("UNITBOX_CONFIG") else None)
    source = explicit or DEFAULT_CONFIG_PATH
    data = _read_toml(source, required=explicit is not None)
    # The limits sections are merged onto the defaults so a file may set one key.
    data = _merge({"limits": Limits().as_dict(), "max_limits": default_maxima().as_dict()}, data)
    from_env, ignored_env = env_overrides(environ)
    data = _merge(data, from_env)
    data = _merge(data, {k: v for k, v in (cli or {}).items() if v is not None})
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        where = f"{source}, UNITBOX_* environment, command line"
        raise ConfigError(_describe(exc, where)) from None
    if source.is_file():
        config._source = source.resolve()
    config._ignored_env = tuple(ignored_env)
    return config
