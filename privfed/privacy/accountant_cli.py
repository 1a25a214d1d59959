"""``privfed-accountant``: the accountant's command line.

privfed-accountant epsilon --sample-rate 0.01 --noise-multiplier 1.0 --steps 10000 --delta 1e-5 \
    [--method pld|rdp]                                    # pld (default): the tight accountant
privfed-accountant sigma --sample-rate 0.01 --steps 10000 --epsilon 3 --delta 1e-5 [--method rdp]
privfed-accountant rqm --clip 0.01 --range-extension 0.0025 --levels 16 --keep-prob 0.5 \
    --sensitivity 2e-4 --dims 1000 --rounds 10 --delta 1e-5   # RQM's exact RDP -> epsilon
privfed-accountant ledger outputs/<run>/ledger.sqlite      # spent epsilon per client
privfed-accountant token --tokens-file tokens.json --client client-0   # prints a new token once
privfed-accountant token --tokens-file tokens.json --operator
privfed-accountant serve --host 127.0.0.1 --port 8765 --db ledger.sqlite --tokens-file tokens.json \
    [--certfile cert.pem --keyfile key.pem]                # the HTTP service (service/app.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

from privfed.privacy.accountant import ACCOUNTANTS, DEFAULT_METHOD, epsilon_from_rdp, spent
from privfed.privacy.calibration import BudgetUnreachableError, calibrate_sigma
from privfed.privacy.events import RQMEvent, SampledGaussianEvent

_METHOD_HELP = (
    "pld: privacy loss distributions (dp-accounting, pessimistic), or RDP where that is smaller; "
    "rdp: Renyi DP only (default: %(default)s)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privfed-accountant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("epsilon", help="epsilon of T steps of the Poisson-sampled Gaussian")
    e.add_argument("--sample-rate", "-q", type=float, required=True)
    e.add_argument("--noise-multiplier", "-s", type=float, required=True)
    e.add_argument("--steps", "-t", type=int, required=True)
    e.add_argument("--delta", "-d", type=float, required=True)
    e.add_argument("--method", choices=list(ACCOUNTANTS), default=DEFAULT_METHOD, help=_METHOD_HELP)

    s = sub.add_parser("sigma", help="smallest noise multiplier meeting (epsilon, delta)")
    s.add_argument("--sample-rate", "-q", type=float, required=True)
    s.add_argument("--steps", "-t", type=int, required=True)
    s.add_argument("--epsilon", "-e", type=float, required=True)
    s.add_argument("--delta", "-d", type=float, required=True)
    s.add_argument("--method", choices=list(ACCOUNTANTS), default=DEFAULT_METHOD, help=_METHOD_HELP)

    r = sub.add_parser("rqm", help="epsilon of RQM releases (exact RDP, privacy/rqm.py)")
    r.add_argument("--clip", "-c", type=float, required=True, help="coordinates lie in [-c, c]")
    r.add_argument("--range-extension", type=float, required=True, help="Delta (absolute)")
    r.add_argument("--levels", "-m", type=int, required=True)
    r.add_argument("--keep-prob", "-q", type=float, required=True)
    r.add_argument("--sensitivity", type=float, required=True, help="per-coordinate bound")
    r.add_argument("--dims", type=int, required=True, help="coordinates one record can change")
    r.add_argument("--rounds", "-t", type=int, default=1)
    r.add_argument("--delta", "-d", type=float, required=True)

    tok = sub.add_parser("token", help="create a bearer token; its hash goes to the file")
    tok.add_argument("--tokens-file", required=True)
    who = tok.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", help="a client token for this client id")
    who.add_argument("--operator", action="store_true", help="an operator token (reads all)")

    srv = sub.add_parser("serve", help="run the accountant HTTP service")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--db", required=True, help="the SQLite ledger file (created if absent)")
    srv.add_argument("--tokens-file", default=None, help="else $PRIVFED_ACCOUNTANT_TOKENS")
    srv.add_argument("--certfile", default=None, help="TLS certificate (PEM); with --keyfile")
    srv.add_argument("--keyfile", default=None)
    srv.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    srv.add_argument(
        "--metrics-per-client",
        action="store_true",
        help="/metrics lists every client's epsilon (it needs no token: keep it private)",
    )
    srv.add_argument(
        "--pricing-workers",
        type=int,
        default=2,
        help="processes per pricing pool (RQM curves; sampled-Gaussian curves and PLD "
        "epsilons); a client holds at most one, so 2 keep one free for the others",
    )
    srv.add_argument(
        "--max-client-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="what one client may store (events, answers, new curves); past it: 429 "
        "(default: %(default)s; a run stores ~1 kB a round)",
    )
    srv.add_argument(
        "--pricing-quota-s",
        type=float,
        default=30.0,
        help="worker seconds one client may use at once (curves, PLDs, ahead included; "
        "default: %(default)s)",
    )
    srv.add_argument(
        "--pricing-quota-rate",
        type=float,
        default=0.25,
        help="worker seconds per second that refill a client's quota (default: %(default)s)",
    )
    srv.add_argument("--log-level", default="warning")

    led = sub.add_parser("ledger", help="spent epsilon per client in a ledger file")
    led.add_argument("path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "epsilon":
            if not 0 < args.delta < 1:
                raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
            event = SampledGaussianEvent(
                q=args.sample_rate, sigma=args.noise_multiplier, steps=args.steps
            )
            result = spent([event], args.delta, args.method)
            print(f"{result.epsilon:.6f}")
            if result.method == "rdp":
                order = epsilon_from_rdp(event.rdp(), args.delta)[1]
                print(f"(RDP, best order {order:g}, delta={args.delta:g})", file=sys.stderr)
            else:
                print(f"(PLD, delta={args.delta:g})", file=sys.stderr)
        elif args.command == "sigma":
            if not 0 < args.delta < 1:
                raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
            SampledGaussianEvent(q=args.sample_rate, sigma=1.0, steps=args.steps)  # validates
            sigma = calibrate_sigma(
                lambda s: [SampledGaussianEvent(q=args.sample_rate, sigma=s, steps=args.steps)],
                args.epsilon,
                args.delta,
                method=args.method,
            )
            print(f"{sigma:.6f}")
            print(f"({args.method.upper()}, delta={args.delta:g})", file=sys.stderr)
        elif args.command == "rqm":
            if not 0 < args.delta < 1:
                raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
            rqm = RQMEvent(
                c=args.clip,
                delta=args.range_extension,
                m=args.levels,
                q=args.keep_prob,
                sensitivity=args.sensitivity,
                dims=args.dims,
                count=args.rounds,
            )
            eps, order = epsilon_from_rdp(rqm.rdp(), args.delta)
            print(f"{eps:.6f}")
            print(f"(exact RQM RDP, best order {order:g}, delta={args.delta:g})", file=sys.stderr)
        elif args.command == "token":
            from privfed.privacy.service.auth import add_token

            role: Literal["operator", "client"] = "operator" if args.operator else "client"
            print(add_token(args.tokens_file, role, args.client))
        elif args.command == "serve":
            return _serve(args)
        else:
            from privfed.privacy.ledger import Ledger

            if not Path(args.path).is_file():
                raise ValueError(f"{args.path}: no such ledger file")
            ledger = Ledger(args.path)
            for client in ledger.clients():
                budget, delta = ledger.budget(client)
                used = ledger.spent_by(client)
                print(
                    f"{client}\tspent={used.epsilon:.4f}\tbudget={budget:g}\tdelta={delta:g}"
                    f"\tby={used.method}"
                )
    except (ValueError, BudgetUnreachableError, OSError) as err:
        print(f"privfed-accountant: {err}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Check everything a user can get wrong before anything is created (tokens, TLS files,
    the ledger), bind the port, and only then say "serving". Each failure is one line, exit 2."""
    import sqlite3

    import uvicorn

    from privfed.privacy.ledger import Ledger
    from privfed.privacy.service.app import create_app
    from privfed.privacy.service.auth import TokenStore
    from privfed.privacy.service.pricing import WorkQuota

    if (args.certfile is None) != (args.keyfile is None):
        raise ValueError("--certfile and --keyfile go together")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.pricing_workers < 1:
        raise ValueError(f"--pricing-workers must be >= 1, got {args.pricing_workers}")
    if args.max_body_bytes < 1024:
        raise ValueError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    if args.max_client_bytes < 64 * 1024:
        raise ValueError(f"--max-client-bytes must be >= 65536, got {args.max_client_bytes}")
    if not args.pricing_quota_s > 0:
        raise ValueError(f"--pricing-quota-s must be > 0, got {args.pricing_quota_s}")
    if not args.pricing_quota_rate > 0:
        raise ValueError(f"--pricing-quota-rate must be > 0, got {args.pricing_quota_rate}")
    tokens = TokenStore.load(args.tokens_file)
    if args.certfile:
        _check_tls(args.certfile, args.keyfile)
    _check_db(args.db)
    sock = _bind(args.host, args.port)  # before the ledger: a failed start creates nothing
    created = not Path(args.db).exists()
    try:
        ledger = Ledger(args.db)
        ledger.check_writable()
    except (ValueError, OSError, sqlite3.Error) as err:
        sock.close()
        if created:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(args.db + suffix).unlink(missing_ok=True)
        why = err.args[0] if isinstance(err, ValueError) else err
        raise ValueError(f"--db {args.db}: the ledger cannot be written ({why})") from None
    app = create_app(
        ledger,
        tokens,
        args.max_body_bytes,
        per_client_metrics=args.metrics_per_client,
        pricing_workers=args.pricing_workers,
        work_quota=WorkQuota(args.pricing_quota_s, args.pricing_quota_rate),
        max_client_bytes=args.max_client_bytes,
    )
    host, port = sock.getsockname()[:2]
    scheme = "https" if args.certfile else "http"
    print(f"privfed-accountant: serving {args.db} on {scheme}://{host}:{port}", flush=True)
    config = uvicorn.Config(
        app,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level=args.log_level,
        access_log=False,
        proxy_headers=False,  # clients connect directly; forwarded-for headers mean nothing here
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    print("privfed-accountant: stopped", flush=True)
    return 0


def _check_db(db: str) -> None:
    """The ledger's folder exists or can be made: name the part of the path in the way."""
    parent = Path(db).resolve().parent
    for part in (parent, *parent.parents):
        if part.exists():
            if not part.is_dir():
                raise ValueError(f"--db {db}: {part} is a file, not a folder")
            break
    if Path(db).is_dir():
        raise ValueError(f"--db {db}: a folder, not a ledger file")


def _check_tls(certfile: str, keyfile: str) -> None:
    import ssl

    for flag, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise ValueError(f"{flag} {path}: {err.strerror}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as err:
        raise ValueError(
            f"--certfile {certfile} / --keyfile {keyfile}: not a certificate and its key ({err})"
        ) from None


def _bind(host: str, port: int):
    """The listening socket, bound now (so that "serving" is printed only once it is true)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise ValueError(
            f"--host {host} --port {port}: cannot listen ({err.strerror or err})"
        ) from None
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
