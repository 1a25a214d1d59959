"""``privfed-edge``: run a real device as a Flower SuperNode with privfed's ClientApp.

    privfed-edge --superlink link.example.org:9093 --root-certificates ca.crt \\
        --auth-key node-3 --partition-id 3 --num-partitions 10 --data-dir /var/lib/privfed \\
        --epsilon 8 [--delta 1e-5] [--accountant-token-file token] [--approve-installed]

The device keeps its own directory (``--data-dir``): its releases (a round is released at most
once, privacy/releases.py), its tokenisation cache, and, for ``data=hf``, its dataset under
``DATA_DIR/dataset`` (``datasets.save_to_disk`` format). It connects over TLS, and with Flower's
node authentication: the operator registers ``node-3.pub`` first (deploy/register.sh), and a
SuperLink started with ``--enable-supernode-auth`` refuses any other key. The run's config
(strategy, noise, model) comes from the server with each run; the privacy budget does not.
``--epsilon``/``--delta`` is this device's own budget over everything it ever releases: it keeps
its own ledger in ``DATA_DIR/device-ledger.sqlite`` and refuses (sits out, trains and sends
nothing) any round the server asks for that would exceed it, any run that is not private, and
any audit run (client/device.py).

The device runs only app bundles its owner approved (``DATA_DIR/approved-apps.txt``, written by
``privfed-app approve``; ``--approve-installed`` approves the bundle of the privfed installed
here): the SuperNode's task commands are privfed's gate (edge_gate.py), which checks each
bundle's digest before any of its code is installed or imported. With no approved bundle the
device does not start.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

from privfed import app_bundle, edge_gate
from privfed.client import device
from privfed.client.context import DATA_DIR_ENV
from privfed.client.release_protocol import RELEASES_ENV
from privfed.privacy.service.client import TOKEN_ENV


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="privfed-edge", description=__doc__.splitlines()[0])
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--root-certificates", type=Path, required=True, help="the CA (PEM)")
    p.add_argument("--auth-key", type=Path, required=True, help="this node's private key")
    p.add_argument("--partition-id", type=int, required=True)
    p.add_argument("--num-partitions", type=int, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="this device's own directory")
    p.add_argument(
        "--epsilon",
        type=float,
        required=True,
        help="this device's own privacy budget over everything it releases (its ledger)",
    )
    p.add_argument("--delta", type=float, default=1e-5, help="its delta (default 1e-5)")
    p.add_argument("--accountant-token-file", type=Path, help="this client's accountant token")
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's local API port")
    p.add_argument(
        "--approved-apps",
        type=Path,
        help="the app digests this device runs (default: DATA_DIR/approved-apps.txt)",
    )
    p.add_argument(
        "--approve-installed",
        action="store_true",
        help="approve the app bundle of the privfed installed here before starting",
    )
    args = p.parse_args(argv)
    for name in ("root_certificates", "auth_key"):
        if not getattr(args, name).is_file():
            p.error(f"--{name.replace('_', '-')}: no such file: {getattr(args, name)}")
    if args.accountant_token_file is not None and not args.accountant_token_file.is_file():
        p.error(f"--accountant-token-file: no such file: {args.accountant_token_file}")
    if not 0 <= args.partition_id < args.num_partitions:
        p.error("--partition-id must be in [0, --num-partitions)")
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        p.error(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    if not 0 < args.delta < 1:
        p.error(f"--delta must be in (0, 1), got {args.delta}")
    return args


def approvals(args: argparse.Namespace) -> app_bundle.Approvals:
    path = args.approved_apps or args.data_dir / app_bundle.APPROVALS_FILE
    return app_bundle.Approvals(path.resolve())


def command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The flower-supernode command line and environment for ``args``: the gate's commands
    first on its PATH, so every task it starts goes through the gate."""
    data_dir = args.data_dir.resolve()
    gate = edge_gate.install_shims(data_dir / "bin")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(gate), os.environ.get("PATH", "")]),
        app_bundle.APPROVALS_ENV: str(approvals(args).path),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        RELEASES_ENV: str(data_dir / "releases"),
        DATA_DIR_ENV: str(data_dir),
        device.EPSILON_ENV: repr(args.epsilon),
        device.DELTA_ENV: repr(args.delta),
        device.LEDGER_ENV: str(data_dir / device.LEDGER_FILE),
        "FLWR_HOME": str(data_dir / "flwr"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    if args.accountant_token_file is not None:
        env[f"{TOKEN_ENV}_FILE"] = str(args.accountant_token_file.resolve())
    cmd = [
        shutil.which("flower-supernode") or "flower-supernode",
        f"--superlink={args.superlink}",
        f"--root-certificates={args.root_certificates.resolve()}",
        f"--auth-supernode-private-key={args.auth_key.resolve()}",
        f"--node-config=partition-id={args.partition_id} num-partitions={args.num_partitions}",
        "--host=127.0.0.1",
        f"--port={args.port}",
        "--isolation=subprocess",  # each task in a process the gate starts (edge_gate.py)
    ]
    return cmd, env


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    approved = approvals(args)
    if args.approve_installed:
        approved.add(app_bundle.installed_digest(), "the privfed installed on this device")
    try:
        digests = approved.digests()
    except ValueError as err:
        raise SystemExit(f"privfed-edge: {err}") from None
    if not digests:
        raise SystemExit(
            f"privfed-edge: no app is approved in {approved.path}: review the operator's "
            "bundle and run `privfed-app approve --data-dir DIR --fab FILE` (or --installed)"
        )
    cmd, env = command(args)
    print(
        f"privfed-edge: runs only the approved app(s) {', '.join(d[:12] for d in digests)} "
        f"({approved.path})"
    )
    print(
        f"privfed-edge: node {args.partition_id} -> {args.superlink} (TLS, node auth); "
        f"this device's budget: epsilon={args.epsilon}, delta={args.delta} "
        f"(ledger {args.data_dir.resolve() / device.LEDGER_FILE})"
    )
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)  # the SuperNode replaces this process (signals reach it)


if __name__ == "__main__":
    main()
