#!/usr/bin/env bash
# TLS and node-authentication material for a privfed federation (Flower SuperLink + SuperNodes).
#
#   deploy/certs.sh OUT_DIR NUM_NODES [HOST ...]
#
# OUT_DIR/ca.crt, ca.key           a private CA (keep ca.key off the devices)
# OUT_DIR/server.pem, server.key   the SuperLink's certificate, valid for localhost, 127.0.0.1,
#                                  "superlink" (the compose service) and every extra HOST
# OUT_DIR/node-<i>, node-<i>.pub   SuperNode i's ECDSA P-384 key pair (Flower node auth: the
#                                  SuperLink accepts only registered public keys)
#
# Idempotent: what exists is kept (a compose restart must not rotate keys under running nodes).
set -euo pipefail

out="${1:?usage: deploy/certs.sh OUT_DIR NUM_NODES [HOST ...]}"
nodes="${2:?usage: deploy/certs.sh OUT_DIR NUM_NODES [HOST ...]}"
shift 2
mkdir -p "$out"
umask 077

if [[ ! -f "$out/ca.crt" ]]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -days 3650 -nodes -subj "/CN=privfed CA" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
fi

if [[ ! -f "$out/server.pem" ]]; then
  san="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1"
  for host in "$@"; do
    if [[ "$host" =~ ^[0-9.]+$ ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
  done
  openssl req -newkey rsa:3072 -sha256 -nodes -subj "/CN=superlink" \
    -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
  openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -days 825 -sha256 -out "$out/server.pem" \
    -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth\n" "$san") 2>/dev/null
  rm -f "$out/server.csr"
fi

for ((i = 0; i < nodes; i++)); do
  if [[ ! -f "$out/node-$i" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "privfed-node-$i" -f "$out/node-$i"
  fi
done
chmod 644 "$out/ca.crt" "$out/server.pem" "$out"/node-*.pub
echo "deploy/certs.sh: CA, SuperLink certificate and $nodes node key pairs in $out"
