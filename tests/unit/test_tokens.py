"""Tokens in the config (named, admin, the old list form, the environment),
their secrets never printed, and a lookup that compares with every token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unitbox import cli, tokens
from unitbox.config import Config, load_config
from unitbox.errors import ConfigError
from unitbox.tokens import EVERYONE, Caller, TokenTable

NO_FILE = Path("/dev/null")
NAMED = """
[tokens.alice]
secret = "alice-s3cret"
[tokens.ops]
secret = "ops-s3cret"
admin = true
"""


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "unitbox.toml"
    path.write_text(text)
    return path


def test_named_tokens_have_a_name_a_secret_and_are_not_admins_unless_said(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, NAMED), environ={})
    assert set(config.tokens) == {"alice", "ops"}
    assert config.tokens["alice"].secret.get_secret_value() == "alice-s3cret"
    assert (config.tokens["alice"].admin, config.tokens["ops"].admin) == (False, True)


def test_the_list_form_keeps_working_and_its_tokens_are_admins(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, 'tokens = ["one", "two"]\n'), environ={})
    assert {name: (t.secret.get_secret_value(), t.admin) for name, t in config.tokens.items()} == {
        "token-1": ("one", True), "token-2": ("two", True)}


def test_the_environment_gives_the_list_form_or_named_tokens() -> None:
    listed = load_config(NO_FILE, environ={"UNITBOX_TOKENS": "one, two"})
    assert [t.secret.get_secret_value() for t in listed.tokens.values()] == ["one", "two"]
    assert all(t.admin for t in listed.tokens.values())
    named = load_config(NO_FILE, environ={"UNITBOX_TOKENS__CI__SECRET": "123",  # text, not the number 123
                                          "UNITBOX_TOKENS__OPS__SECRET": "true", "UNITBOX_TOKENS__OPS__ADMIN": "true"})
    assert {name: (t.secret.get_secret_value(), t.admin) for name, t in named.tokens.items()} == {
        "ci": ("123", False), "ops": ("true", True)}
    assert named.ignored_env == ()


def test_check_config_never_prints_a_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "setup_logging", lambda *_: None)
    for text in (NAMED, 'tokens = ["list-s3cret"]\n'):
        path = config_file(tmp_path, text)
        assert cli.main(["--config", str(path), "check-config", "--json"]) == 0
        assert cli.main(["--config", str(path), "check-config"]) == 0
        out = capsys.readouterr().out
        assert "s3cret" not in out
        printed = json.loads(out[:out.rindex("}") + 1])
        assert {t["secret"] for t in printed["tokens"].values()} == {"**********"}
    assert "s3cret" not in repr(load_config(path, environ={}))


@pytest.mark.parametrize(("text", "named"), [
    ('[tokens.alice]\nsecret = "dup-s3cret"\n[tokens.bob]\nsecret = "dup-s3cret"\n',
     "tokens.bob has the same secret as tokens.alice"),
    ('[tokens."no spaces"]\nsecret = "x-s3cret"\n', "tokens.no spaces"),
    ('[tokens.alice]\nsecret = " s3cret"\n', "tokens.alice.secret"),
    ('[tokens.alice]\nsecret = "s3cret"\nadmin = "s3cret"\n', "tokens.alice.admin"),
    ('[tokens.alice]\nsecret = "s3cret"\nsecrett = "s3cret"\n', "tokens.alice.secrett"),
    ('[tokens.alice]\nadmin = true\n', "tokens.alice.secret"),
])
def test_a_bad_token_is_an_error_naming_it_without_its_secret(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config_file(tmp_path, text), environ={})
    assert named in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_identify_compares_with_every_token_and_finds_the_right_one(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config.model_validate({"tokens": {"a": {"secret": "sa"}, "b": {"secret": "sb"},
                                               "c": {"secret": "sc", "admin": True}}})
    table = TokenTable(config.tokens)
    compared: list[tuple[bytes, bytes]] = []
    real = tokens.hmac.compare_digest

    def counting(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return real(given, expected)
    monkeypatch.setattr(tokens.hmac, "compare_digest", counting)
    for given, expected in [(b"sa", Caller("a", False)), (b"sc", Caller("c", True)), (b"sb", Caller("b", False)),
                            (b"nope", None), (b"", None), (b"sa" * 1000, None)]:
        compared.clear()
        assert table.identify(given) == expected
        assert len(compared) == 3, "stopped early: the time taken would tell which token matched"
        assert {len(g) for g, _ in compared} == {len(e) for _, e in compared} == {32}  # lengths never differ


def test_callers_see_their_own_runs_and_admins_everyones() -> None:
    alice, ops = Caller("alice", False), Caller("ops", True)
    assert alice.sees("alice") and not alice.sees("bob") and not alice.sees(None)
    assert ops.sees("alice") and ops.sees(None) and EVERYONE.sees("bob")
    assert (alice.only_owner, ops.only_owner, EVERYONE.only_owner) == ("alice", None, None)
