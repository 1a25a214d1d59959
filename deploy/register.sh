#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink that runs --enable-supernode-auth (Flower's node
# authentication: only registered keys may connect). Idempotent: a key already registered is ok.
#
#   deploy/register.sh SUPERLINK_ADDRESS CA_CERT PUBLIC_KEY ...
set -euo pipefail
address="${1:?usage: deploy/register.sh SUPERLINK_ADDRESS CA_CERT PUBLIC_KEY ...}"
ca="${2:?}"
shift 2
export FLWR_HOME="${FLWR_HOME:-$(mktemp -d)}"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "privfed"

[superlink.privfed]
address = "$address"
insecure = false
root-certificates = "$(realpath "$ca")"
TOML
for key in "$@"; do
  if out="$(flwr supernode register "$key" privfed 2>&1)"; then
    echo "registered $key"
  elif grep -qi "already" <<<"$out"; then
    echo "already registered: $key"
  else
    echo "$out" >&2
    exit 1
  fi
done
