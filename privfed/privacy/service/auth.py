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
    def from_json(cls, text: str, source: str = "tokens") -> TokenStore:
        """Parse a token file; a ValueError names what is wrong in one line. A file without a
        single token is refused too: the service would answer every request with 401."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not JSON ({err})") from None
        items = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ValueError(f'{source}: expected {{"tokens": [...]}}, got {text.strip()[:40]!r}')
        entries = {}
        for n, item in enumerate(items):
            where = f"{source}: tokens[{n}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected an object, got {item!r}"[:200])
            digest = item.get("sha256")
            if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
                raise ValueError(f"{where}: sha256 must be 64 hex digits (a token's hash)")
            role = item.get("role")
            if role not in ("operator", "client"):
                raise ValueError(f"{where}: role must be 'operator' or 'client', got {role!r}")
            client_id = item.get("client_id")
            if role == "client" and not (isinstance(client_id, str) and client_id):
                raise ValueError(f"{where}: a client token needs a client_id")
            entries[digest.lower()] = Principal(role, client_id if role == "client" else None)
        if not entries:
            raise ValueError(
                f"{source}: no tokens (create one: privfed-accountant token --tokens-file F "
                "--operator)"
            )
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path | None) -> TokenStore:
        """From ``path``, else from ``$PRIVFED_ACCOUNTANT_TOKENS``; refuses to run without."""
        if path is not None:
            try:
                text = Path(path).read_text()
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"--tokens-file {path}: {err}") from None
            return cls.from_json(text, source=f"--tokens-file {path}")
        if os.environ.get(TOKENS_ENV):
            return cls.from_json(os.environ[TOKENS_ENV], source=f"${TOKENS_ENV}")
        raise ValueError(f"no tokens: pass --tokens-file or set ${TOKENS_ENV}")

    def resolve(self, token: str) -> Principal | None:
        return self._by_hash.get(hash_token(token))


def _is_hex(text: str) -> bool:
    return all(ch in "0123456789abcdefABCDEF" for ch in text)


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
