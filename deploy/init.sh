#!/usr/bin/env bash
# One-shot setup of a federation's secrets (idempotent: a restart keeps what exists).
#
#   deploy/init.sh CERTS_DIR SECRETS_DIR LEDGER_DIR NUM_NODES [HOST ...]
#
# CERTS_DIR    the CA, the SuperLink certificate, node key pairs (deploy/certs.sh)
# SECRETS_DIR  operator.token (the server's accountant token), client_tokens.json
#              ({"client-i": token}, read by the ClientApps)
# LEDGER_DIR   tokens.json: only the SHA-256 hashes, read by the accountant service
set -euo pipefail
certs="${1:?usage: deploy/init.sh CERTS SECRETS LEDGER NUM_NODES [HOST ...]}"
secrets="${2:?}"
ledger="${3:?}"
nodes="${4:?}"
shift 4
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/certs.sh" "$certs" "$nodes" "$@"
mkdir -p "$secrets" "$ledger"
umask 077
if [[ ! -f "$secrets/operator.token" ]]; then
  privfed-accountant token --tokens-file "$ledger/tokens.json" --operator >"$secrets/operator.token"
fi
if [[ ! -f "$secrets/client_tokens.json" ]]; then
  {
    echo "{"
    for ((i = 0; i < nodes; i++)); do
      token="$(privfed-accountant token --tokens-file "$ledger/tokens.json" --client "client-$i")"
      sep=$([[ $i -lt $((nodes - 1)) ]] && echo "," || echo "")
      echo "  \"client-$i\": \"$token\"$sep"
    done
    echo "}"
  } >"$secrets/client_tokens.json"
fi
echo "deploy/init.sh: tokens for the operator and $nodes clients in $secrets"
