"""API tokens: who a request is, and which runs that caller may see.

A token has a name (recorded as the owner of the runs it submits) and a
secret. A token sees only the runs it submitted; an admin token sees all.
The old list form (`tokens = ["a", "b"]`, `UNITBOX_TOKENS=a,b`) had no owners
at all, every holder saw every run: its tokens become admins named
`token-1`, `token-2`… so an upgrade changes nothing for its clients (the
named form is how an operator opts in to owners).

Secrets are pydantic SecretStr: `check-config --json`, reprs and config
errors print them as `**********`, never in clear."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class TokenSection(BaseModel):
    """`[tokens.NAME]` in the config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: SecretStr
    admin: bool = False

    @field_validator("secret")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not secret or secret != secret.strip():
            raise ValueError("must be non-empty, without leading or trailing spaces")
        return value


def tokens_from_list(value: Any) -> Any:
    """The list form → admins named token-1, token-2… (see the module's docstring)."""
    if isinstance(value, list | tuple):
        return {f"token-{number}": {"secret": secret, "admin": True} for number, secret in enumerate(value, 1)}
    return value


def check_tokens(tokens: Mapping[str, TokenSection]) -> None:
    """Names usable as an owner; no secret shared by two names (it would
    identify both). Messages name tokens, never their secrets."""
    seen: dict[str, str] = {}
    for name, token in tokens.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"tokens.{name}: a token's name is 1-64 letters, digits, '_', '.' or '-'")
        secret = token.secret.get_secret_value()
        if secret in seen:
            raise ValueError(f"tokens.{name} has the same secret as tokens.{seen[secret]}")
        seen[secret] = name


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request is. `name` is recorded as the owner of what it submits."""

    name: str | None
    admin: bool

    def sees(self, owner: str | None) -> bool:
        return self.admin or owner == self.name

    @property
    def only_owner(self) -> str | None:
        """The owner a listing is restricted to; None: every run."""
        return None if self.admin else self.name


EVERYONE = Caller(name=None, admin=True)
"""The caller when the server has no tokens: sees every run, as before owners existed."""


class TokenTable:
    def __init__(self, tokens: Mapping[str, TokenSection]) -> None:
        self._entries = [(_digest(t.secret.get_secret_value().encode()), Caller(name, t.admin))
                         for name, t in tokens.items()]

    def identify(self, given: bytes) -> Caller | None:
        """The caller whose secret is `given`, else None. Compares digests
        (equal lengths) with every token, without stopping at a match: the
        time taken tells neither a secret's length nor which token matched."""
        digest = _digest(given)
        found: Caller | None = None
        for expected, caller in self._entries:
            if hmac.compare_digest(digest, expected):
                found = caller
        return found


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()
