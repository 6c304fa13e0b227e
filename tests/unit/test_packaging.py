"""The Debian package's static parts agree with the code: the shipped config
lists every key with its default, the man page every command and option, the
versions match, and the daemon unit has what the daemon relies on."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from unitbox import __version__
from unitbox.cli import _parser
from unitbox.config import Config, RetentionSection, WarmSection, load_config
from unitbox.profile import STAGE_ROOT

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "packaging" / "unitbox.toml"
MANPAGE = REPO / "packaging" / "unitbox.1"
SERVICE = REPO / "units" / "unitbox.service"


def _uncommented() -> str:
    """The template with every `#key = value` line made live."""
    return re.sub(r"^#(\[?[a-z_.]+\]?( = .*)?)$", r"\1", TEMPLATE.read_text(), flags=re.M)


def test_the_shipped_config_is_all_defaults() -> None:
    shipped = load_config(TEMPLATE, environ={}).model_dump()
    assert shipped == load_config(Path("/dev/null"), environ={}).model_dump()


def test_the_shipped_config_names_every_key_with_its_default() -> None:
    live = tomllib.loads(_uncommented())
    defaults = Config().model_dump(mode="json")
    machine_dependent = {"max_concurrent", "max_limits.cpu_percent"}
    examples = {"broker_socket", "store", "node", "advertise"}  # default None, which TOML cannot write: shown with an example

    def check(model: type[BaseModel], values: dict[str, Any], expected: dict[str, Any], prefix: str) -> None:
        for name in model.model_fields:
            key = prefix + name
            assert name in values, f"{key} is missing from {TEMPLATE.name}"
            if isinstance(expected.get(name), dict) and name not in ("runtimes", "tokens", "warm"):
                sub = Config.model_fields[name].annotation
                assert isinstance(sub, type) and issubclass(sub, BaseModel)
                check(sub, values[name], expected[name], key + ".")
            elif key not in machine_dependent | examples and name not in ("runtimes", "tokens", "warm"):
                assert values[name] == expected[name], f"{key}: {values[name]!r} != default {expected[name]!r}"

    check(Config, live, defaults, "")
    assert set(live["retention"]) == set(RetentionSection.model_fields)
    example = live["runtimes"]
    assert example and all({"python", "path"} <= set(runtime) for runtime in example.values())
    assert defaults["warm"] == {}  # off unless configured
    assert live["warm"] == {"default": WarmSection().model_dump(mode="json")}  # the example shows the defaults
    assert live["tokens"] and all({"secret", "admin"} <= set(token) for token in live["tokens"].values())


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix} {name}".strip()))
    return found


def test_the_man_page_covers_every_command_and_option() -> None:
    page = MANPAGE.read_text().replace("\\-", "-")
    for command, parser in _commands(_parser()).items():
        if command:
            assert f".B {command}" in page or f".BI \"{command} " in page, f"man page lacks `{command}`"
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--"):
                    assert option in page, f"man page lacks {option} ({command or 'unitbox'})"


def test_versions_agree() -> None:
    changelog = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.match(rf"unitbox \({re.escape(__version__)}\) ", changelog)
    assert pyproject == __version__
    assert f'"unitbox {__version__}"' in MANPAGE.read_text()



def test_every_dependency_is_pinned_for_the_package_within_its_range() -> None:
    """The .deb installs packaging/requirements.txt offline with --no-deps: a
    dependency added to pyproject.toml alone would be missing at run time."""
    pinned = {canonicalize_name(name): version for name, version in
              re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "packaging" / "requirements.txt").read_text(), re.M)}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in pinned, f"{wanted.name} is not pinned in packaging/requirements.txt"
        assert wanted.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {wanted.specifier}"

def _unit(name: str) -> dict[str, list[str]]:
    """A unit file's settings, each with all its values in order."""
    settings: dict[str, list[str]] = {}
    for line in (REPO / "units" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def _one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_the_daemon_unit() -> None:
    settings = _unit("unitbox.service")
    assert _one(settings, "Type") == "notify" and _one(settings, "NotifyAccess") == "main"
    assert _one(settings, "StateDirectory") == "unitbox/daemon" and _one(settings, "StateDirectoryMode") == "0700"
    assert int(_one(settings, "FileDescriptorStoreMax")) > 0  # the daemon parks output pipes there
    assert _one(settings, "KillMode") == "mixed"  # runs are units of their own and outlive a restart
    assert _one(settings, "CapabilityBoundingSet") == ""
    assert _one(settings, "PrivateUsers") == "yes"
    assert _one(settings, "User") == _one(settings, "Group") == "unitbox"


def test_the_split_units_agree() -> None:
    """The daemon, the broker's socket and the broker, the sysusers.d and
    tmpfiles.d files name the same user, socket and directories, and each
    side's command line parses as the CLI has it."""
    front, socket, broker = _unit("unitbox.service"), _unit("unitbox-broker.socket"), _unit("unitbox-broker@.service")
    front_args = _parser().parse_args(_one(front, "ExecStart").split()[1:])
    broker_args = _parser().parse_args(_one(broker, "ExecStart").split()[1:])
    path = _one(socket, "ListenSequentialPacket")
    assert front_args.command == "serve" and str(front_args.broker_socket) == path
    assert front_args.state_dir is None  # the daemon and the broker read state_dir from the same file
    assert "unitbox-broker.socket" in _one(front, "Requires") and "unitbox-broker.socket" in _one(front, "After")
    assert _one(socket, "Accept") == "yes" and _one(socket, "SocketMode") == "0660"
    assert _one(socket, "SocketUser") == "root" and _one(socket, "SocketGroup") == _one(front, "Group")
    assert 1 < int(_one(socket, "MaxConnections")) <= 8
    assert broker_args.command == "broker" and broker_args.socket_activated and broker_args.fd is None
    assert broker_args.front_user == _one(front, "User")
    assert "User" not in broker and "PrivateUsers" not in broker  # uid 0 on the host: the bus and file owners
    assert _one(broker, "Group") == _one(front, "Group")  # so ends/ is root:unitbox
    assert _one(broker, "StateDirectory") == "unitbox/ends" and _one(broker, "StateDirectoryMode") == "0750"
    assert _one(broker, "ReadWritePaths") == STAGE_ROOT and _one(broker, "ProtectSystem") == "strict"
    assert _one(broker, "CapabilityBoundingSet") == "" and _one(broker, "PrivateNetwork") == "yes"
    assert "unitbox.service" in _one(broker, "Before")  # at shutdown the daemon stops first
    sysusers = (REPO / "packaging" / "debian" / "unitbox.sysusers").read_text()
    assert re.search(rf"^u {_one(front, 'User')} - ", sysusers, re.M), sysusers
    tmpfiles = (REPO / "packaging" / "debian" / "unitbox.tmpfiles").read_text()
    assert re.search(rf"^d {re.escape(STAGE_ROOT)} 0700 root root -$", tmpfiles, re.M), tmpfiles
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    for unit in ("unitbox.service", "unitbox.slice", "unitbox-broker.socket", "unitbox-broker@.service"):
        assert f"units/{unit} " in rules, f"debian/rules does not install {unit}"
    assert "dh_installsystemd unitbox.service unitbox-broker.socket\n" in rules
