"""Bearer tokens of the accountant service, stored hashed.

A token file (JSON) holds only SHA-256 hashes: ``{"tokens": [{"sha256": ..., "role": "operator"}
, {"sha256": ..., "role": "client", "client_id": "client-3"}]}``. ``privfed-accountant token``
creates a token, prints it once and stores its hash. The server reads the file (or the same JSON
from ``$PRIVFED_ACCOUNTANT_TOKENS``), never a token on its command line. Tokens are random
(256 bits), so an unsalted SHA-256 is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TOKENS_ENV = "PRIVFED_ACCOUNTANT_TOKENS"


@dataclass(frozen=True)
class Principal:
    role: Literal["operator", "client"]
    client_id: str | None = None

    def may_access(self, client_id: str) -> bool:
        return self.role == "operator" or self.client_id == client_id


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, entries: dict[str, Principal]) -> None:
        self._by_hash = dict(entries)

    @classmethod
    def from_json(cls, text: str) -> TokenStore:
        data = json.loads(text)
        entries = {}
        for item in data.get("tokens", []):
            role = item["role"]
            if role not in ("operator", "client"):
                raise ValueError(f"token file: unknown role {role!r}")
            if role == "client" and not item.get("client_id"):
                raise ValueError("token file: a client token needs a client_id")
            entries[str(item["sha256"])] = Principal(role, item.get("client_id"))
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path | None) -> TokenStore:
        """From ``path``, else from ``$PRIVFED_ACCOUNTANT_TOKENS``; refuses to run without."""
        if path is not None:
            return cls.from_json(Path(path).read_text())
        if os.environ.get(TOKENS_ENV):
            return cls.from_json(os.environ[TOKENS_ENV])
        raise ValueError(f"no tokens: pass --tokens-file or set ${TOKENS_ENV}")

    def resolve(self, token: str) -> Principal | None:
        return self._by_hash.get(hash_token(token))


def add_token(path: str | Path, role: Literal["operator", "client"], client_id: str | None) -> str:
    """Create a token, store its hash in ``path`` (created 0600) and return the token."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"tokens": []}
    token = secrets.token_urlsafe(32)
    entry: dict[str, str] = {"sha256": hash_token(token), "role": role}
    if client_id is not None:
        entry["client_id"] = client_id
    data["tokens"].append(entry)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    tmp.replace(path)
    return token
