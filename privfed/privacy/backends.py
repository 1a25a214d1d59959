"""The accountant a component talks to: the embedded SQLite ledger, or the HTTP service.

Both have the same methods and give the same answers (the service runs the same ledger code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from privfed.config import PrivacyConfig
from privfed.privacy.ledger import Ledger
from privfed.privacy.service.client import TOKEN_ENV, AccountantClient

OPERATOR_TOKEN_ENV = "PRIVFED_ACCOUNTANT_OPERATOR_TOKEN"


def env_secret(name: str) -> str | None:
    """``$NAME``, else the contents of the file named by ``$NAME_FILE`` (the docker secrets
    convention: a token in a mounted file, never in the environment listing)."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(f"{name}_FILE")
    return Path(path).read_text().strip() if path else None


def _client(
    privacy: PrivacyConfig, token: str | None, retry_for_s: float | None = None
) -> AccountantClient:
    acc = privacy.accountant
    if acc.url is None:
        raise ValueError("privacy.accountant.url: required when accountant.backend=http")
    return AccountantClient(
        acc.url,
        token=token,
        timeout_s=acc.timeout_s,
        retry_for_s=acc.retry_for_s if retry_for_s is None else retry_for_s,
        verify=acc.ca_file or True,
    )


def server_accountant(
    privacy: PrivacyConfig, ledger_file: Path, retry_for_s: float | None = None
) -> Ledger | AccountantClient:
    """The server's view (registers budgets, reads every client): the operator token.
    ``retry_for_s`` overrides the configured retry window (a quick check before a run)."""
    if privacy.accountant.backend == "embedded":
        return Ledger(ledger_file)
    token = env_secret(OPERATOR_TOKEN_ENV)
    if not token:
        raise ValueError(
            f"privacy.accountant: backend=http needs ${OPERATOR_TOKEN_ENV} or "
            f"${OPERATOR_TOKEN_ENV}_FILE (server)"
        )
    return _client(privacy, token, retry_for_s)


def client_accountant(
    privacy: PrivacyConfig, client_id: str, ledger_file: Path
) -> Ledger | AccountantClient:
    """A client's view: its own token ($PRIVFED_ACCOUNTANT_TOKEN, else the tokens file)."""
    if privacy.accountant.backend == "embedded":
        return Ledger(ledger_file)
    token = env_secret(TOKEN_ENV)
    if not token and privacy.accountant.client_tokens_file:
        tokens = json.loads(Path(privacy.accountant.client_tokens_file).read_text())
        token = tokens.get(client_id)
    if not token:
        raise ValueError(f"privacy.accountant: no token for {client_id} (set ${TOKEN_ENV})")
    return _client(privacy, token)
