"""Typed configuration: defaults < /etc/unitbox/unitbox.toml < UNITBOX_*
environment < command-line flags, validated once at startup with messages
that name the offending key. Needs no file at all for the defaults to work.
An unknown key in the file or the flags is an error; an unknown UNITBOX_*
variable is ignored and named in a warning (the environment is shared).

pydantic-settings reads the sources and merges them; what is ours is the
policy around it: which file, which variables are settings at all, and the
comma-separated lists the environment has always accepted."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from unitbox.errors import ConfigError
from unitbox.limits import MIN_TASKS, Limits, default_maxima
from unitbox.tokens import TokenSection, check_tokens, tokens_from_list

DEFAULT_CONFIG_PATH = Path("/etc/unitbox/unitbox.toml")
ENV_PREFIX = "UNITBOX_"
NESTING = "__"


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


class FilesSection(_Section):
    """Files a run takes in (input files placed in its working directory) and
    leaves behind (output files collected when it ends)."""

    input_count: int = Field(default=100, ge=0)
    input_kb: int = Field(default=1024, ge=0)  # all input files together (the request body caps them too)
    path_chars: int = Field(default=255, gt=0, le=4096)  # an input path; also an output file's path
    output_count: int = Field(default=100, ge=0)
    output_file_mb: int = Field(default=32, gt=0)
    output_total_mb: int = Field(default=64, gt=0)
    output_depth: int = Field(default=8, ge=0)
    output_entries: int = Field(default=10_000, gt=0)  # entries looked at, collected or not


class LintSection(_Section):
    ruff: str = ""
    """The ruff binary runs are checked with; empty: the one beside the daemon's Python, or on PATH."""


class RuntimeSection(_Section):
    python: str
    """Interpreter inside the runtime, as runs see it."""
    path: str | None = None
    """Directory bind-mounted read-only into runs (a venv); None for the host's Python."""


class WarmSection(_Section):
    """A pool of warm units for one runtime (broker/warm.py; docs/operations.md)."""

    size: int = Field(default=2, ge=0, le=64)
    """Units kept ready; 0: none (every run of this runtime starts cold)."""
    preload: list[str] = Field(default_factory=list)
    """Modules each unit imports while it waits (e.g. numpy, pandas)."""
    max_idle_s: float = Field(default=600.0, gt=0, le=86_400, allow_inf_nan=False)
    """A unit idle this long is replaced by a fresh one."""

    @field_validator("preload")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"{name!r} is not a module name")
        return value


@dataclass(frozen=True)
class _Inputs:
    """What one load reads besides the flags: settings_customise_sources is a
    classmethod with no per-call arguments, so these reach it by a context
    variable that load_config sets for the length of the call."""

    file: Path | None
    environ: Mapping[str, str]


_INPUTS: ContextVar[_Inputs | None] = ContextVar("unitbox_config_inputs", default=None)


POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix=ENV_PREFIX, env_nested_delimiter=NESTING,
        # Keys in the file and the flags are exact, as in the sections; the
        # environment source alone matches without case (UNITBOX_QUEUE_SIZE).
        case_sensitive=True,
        # A [limits] table that sets one key keeps the defaults of the others.
        nested_model_default_partial_update=True,
    )

    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:8080"])
    tokens: dict[str, TokenSection] = Field(default_factory=dict)
    state_dir: Path = Path("/var/lib/unitbox")
    # The run store (store/): None is SQLite under state_dir; a PostgreSQL URL (libpq's form,
    # "postgresql:///unitbox?host=/run/postgresql") keeps the records in that database.
    store: str | None = None
    # Nodes sharing a PostgreSQL store (docs/operations.md "Several nodes"): this daemon's name
    # there (None: the host name) and the URL the other nodes relay requests for its runs to
    # (None: http:// and the first TCP address of `listen`; a wildcard address becomes the host name).
    node: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    advertise: str | None = Field(default=None, pattern=r"^https?://[^/]+$")
    # A node silent this long is lost: another node ends its unfinished runs as `error`.
    node_grace_s: float = Field(default=300.0, ge=5, allow_inf_nan=False)
    # The broker's socket (the packaged split: the daemon as its own user, the
    # broker a root unit of its own); None: the daemon, as root, starts the
    # broker as its child (`unitbox serve` by hand, `make run`, the tests).
    broker_socket: Path | None = None
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
    # Plain defaults, not factories: nested_model_default_partial_update merges onto these.
    limits: LimitsSection = LimitsSection.model_validate(Limits().as_dict())
    max_limits: LimitsSection = LimitsSection.model_validate(default_maxima().as_dict())
    retention: RetentionSection = Field(default_factory=RetentionSection)
    files: FilesSection = Field(default_factory=FilesSection)
    lint: LintSection = Field(default_factory=LintSection)
    result_kb: int = Field(default=1024, gt=0)  # an entrypoint's value, as JSON
    inline_output_kb: int = Field(default=64, ge=0)  # stdout and stderr each, in a waited answer
    playground: bool = True  # GET / and /playground serve the page (api/playground.py); false: 404
    runtimes: dict[str, RuntimeSection] = Field(default_factory=dict)
    # Pools of warm units, by runtime name (broker/warm.py). None unless configured: a run
    # handed to one runs in unitbox-warm-<slot>.service, not in a unit named after it.
    warm: dict[str, WarmSection] = Field(default_factory=dict)
    _source: Path | None = PrivateAttr(default=None)
    _ignored_env: tuple[str, ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: the flags (init arguments), the environment, the
        file. No .env file and no secrets directory: not ours to read."""
        inputs = _INPUTS.get() or _Inputs(file=None, environ={})  # Config() alone: the defaults, nothing read
        return (init_settings, _Environment(settings_cls, inputs.environ),
                TomlConfigSettingsSource(settings_cls, toml_file=inputs.file))

    @field_validator("listen")
    @classmethod
    def _listen_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            parse_listen(address)
        return value

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(POSTGRESQL_SCHEMES):
            raise ValueError(f"not a PostgreSQL URL: {value!r} (postgresql://…; leave it out for SQLite)")
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

    # The state directory's parts: who writes each is the point (docs/sandbox.md).
    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname()

    @property
    def advertise_url(self) -> str:
        """Where other nodes reach this one: `advertise`, or the first TCP `listen` address."""
        if self.advertise is not None:
            return self.advertise
        for address in self.listen:
            target = parse_listen(address)
            if isinstance(target, tuple):
                host, port = target
                host = socket.gethostname() if host in ("0.0.0.0", "::") else host
                return f"http://{f'[{host}]' if ':' in host else host}:{port}"
        return f"http://{socket.gethostname()}"  # Unix sockets only: set `advertise` for a cluster

    @property
    def data_dir(self) -> Path:
        """The daemon's own: its database and each run's inputs and output (its user's)."""
        return self.state_dir / "daemon"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "unitbox.db"

    @property
    def ends_dir(self) -> Path:
        """What root writes for runs (outcomes, collected files): the broker's, read by the daemon."""
        return self.state_dir / "ends"


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


class _Environment(EnvSettingsSource):
    """UNITBOX_* variables from the mapping given (tests pass their own, the
    daemon os.environ), already sifted to those that name a setting."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # pydantic-settings' one hook for where variables come from (its own
        # .env source overrides it too); names lowercased as it does.
        return {name.lower(): value for name, value in self._environ.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        # UNITBOX_LISTEN=a:1,b:2 and UNITBOX_TOKENS=one,two: the comma form
        # predates JSON here; JSON ([…] or {…}) still works for both.
        top_level = field is not None and self.settings_cls.model_fields.get(field_name) is field
        if top_level and field_name in _COMMA_LISTS and not str(value).lstrip().startswith(("[", "{")):
            return [part.strip() for part in str(value).split(",") if part.strip()]
        try:
            return super().decode_complex_value(field_name, field, value)  # type: ignore[arg-type]
        except ValueError as exc:  # pydantic-settings names the source class; say the variable
            raise ValueError(f"{field_name}: {ENV_PREFIX}{field_name.upper()} is not valid JSON ({exc})") from None


_COMMA_LISTS = frozenset({"listen", "tokens"})


def _names_a_setting(path: list[str]) -> bool:
    """Whether a lowercased, split variable name (limits__timeout_s,
    runtimes__sci__python, tokens__ci__secret) is a key of Config: walk the
    models' fields and the dicts' names down to a value."""
    node: Any = Config
    for part in path:
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        elif get_origin(node) is dict and part:
            node = get_args(node)[1]
        else:
            return False
    return True


def _sift_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """The UNITBOX_* variables that name a setting, and the names of those
    that do not: these are ignored, since the environment holds more than our
    settings (a test harness's UNITBOX_TEST_HOST must not stop the daemon)."""
    known: dict[str, str] = {}
    ignored = []
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "UNITBOX_CONFIG":
            continue
        if _names_a_setting(name.removeprefix(ENV_PREFIX).lower().split(NESTING)):
            known[name] = value
        else:
            ignored.append(name)
    return known, tuple(ignored)


def _config_file(path: Path | None, environ: Mapping[str, str]) -> Path:
    """The file to read: one named (by --config or UNITBOX_CONFIG) must exist;
    the default may be absent, leaving the defaults."""
    explicit = path or (Path(environ["UNITBOX_CONFIG"]) if environ.get("UNITBOX_CONFIG") else None)
    if explicit is not None and not explicit.exists():
        raise ConfigError(f"{explicit}: no such config file")
    if explicit is not None and explicit.is_dir():
        raise ConfigError(f"{explicit}: is a directory, not a config file")
    return explicit or DEFAULT_CONFIG_PATH


@contextmanager
def _reading(inputs: _Inputs) -> Iterator[None]:
    token = _INPUTS.set(inputs)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def _describe(exc: ValidationError | SettingsError, source: str) -> str:
    if isinstance(exc, SettingsError):  # a variable that is not valid JSON (_Environment)
        return f"invalid configuration ({source}): {exc.__cause__ or exc}"
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{key}: {error['msg']}")
    return f"invalid configuration ({source}): " + "; ".join(problems)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None,
                cli: Mapping[str, Any] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    source = _config_file(path, environ)
    settings, ignored_env = _sift_environment(environ)
    flags = {key: value for key, value in (cli or {}).items() if value is not None}
    try:
        with _reading(_Inputs(source, settings)):
            config = Config(**flags)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except OSError as exc:  # unreadable: permissions, I/O
        raise ConfigError(f"{source}: {exc.strerror or exc}") from None
    except (ValidationError, SettingsError) as exc:
        where = f"{source}, UNITBOX_* environment, command line"
        raise ConfigError(_describe(exc, where)) from None
    if source.is_file():
        config._source = source.resolve()
    config._ignored_env = ignored_env
    return config
