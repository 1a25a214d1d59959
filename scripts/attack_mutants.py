"""Each defence removed, one at a time: the attack tests must notice.

    python scripts/attack_mutants.py            # every mutant; exit 1 if one survives
    python scripts/attack_mutants.py --list     # what each mutant removes
    python scripts/attack_mutants.py secret_key_counter fresh_key_cached

A mutant is one text substitution in a copy of the privfed package (the copy is put first on
PYTHONPATH, the checkout is never touched). The attack tests (tests/unit/test_against_the_server
.py, test_randomness.py, test_app_bundle.py; secure aggregation's: test_secure_round.py,
test_secagg.py, test_distributed_dg.py) then run against it, and the mutant is *killed* if at
least one of them fails. A surviving mutant is a defence no test would miss. The defences that
only a whole deployment exercises have their own tests, run with their defence removed by hand
(docs/privacy.md, "The attacks, kept as tests").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/unit/test_against_the_server.py",
    "tests/unit/test_randomness.py",
    "tests/unit/test_app_bundle.py",
]


SECURE = (  # secure aggregation's attacks (privacy.user.aggregation=secure)
    "tests/unit/test_secure_round.py",
    "tests/unit/test_secagg.py",
    "tests/unit/test_distributed_dg.py",
)


@dataclass(frozen=True)
class Mutant:
    name: str
    defence: str
    path: str  # in the package
    old: str
    new: str
    tests: tuple[str, ...] = tuple(TESTS)  # the attack tests that must notice


MUTANTS = [
    Mutant(
        "secret_key_counter",
        "secret keys: from the OS",
        "randomness.py",
        "        return cls(os_key(), secret=True, purpose=purpose)",
        "        global _COUNT\n"
        "        _COUNT = globals().get('_COUNT', 0) + 1\n"
        "        key = hashlib.sha256(str(_COUNT).encode()).digest()\n"
        "        return cls(key, secret=True, purpose=purpose)",
    ),
    Mutant(
        "secret_key_20_bits",
        "secret keys: 256 bits",
        "randomness.py",
        "        return cls(os_key(), secret=True, purpose=purpose)",
        "        import secrets as _s\n"
        "        key = hashlib.sha256(_s.randbits(20).to_bytes(3, 'little')).digest()\n"
        "        return cls(key, secret=True, purpose=purpose)",
    ),
    Mutant(
        "fresh_key_cached",
        "fresh keys: one per stream",
        "randomness.py",
        "        return cls(os_key(), secret=True, purpose=purpose)",
        "        global _KEY\n"
        "        _KEY = globals().get('_KEY') or os_key()\n"
        "        return cls(_KEY, secret=True, purpose=purpose)",
    ),
    Mutant(
        "noise_from_config",
        "noise: secret, not config-derived",
        "privacy/dp_sgd.py",
        "    if not private:\n        return RoundRandomness.public(seed, client, server_round)\n"
        "    return RoundRandomness.secret()",
        "    return RoundRandomness.public(seed, client, server_round)",
    ),
    Mutant(
        "noise_removed",
        "noise: added at all",
        "privacy/opacus_streams.py",
        "    if std == 0:\n",
        "    if True:\n",
    ),
    Mutant(
        "sampling_from_config",
        "sampling: secret",
        "privacy/dp_sgd.py",
        '            RandomStream.secret("dp_sgd.sampling"),',
        '            RandomStream.public(0, "dp_sgd.sampling"),',
    ),
    Mutant(
        "private_metrics_allowed",
        "public fields only",
        "client/release_protocol.py",
        "        private = sorted(set(metrics) - keys.PUBLIC_REPLY_METRICS)",
        "        private = []",
    ),
    Mutant(
        "undeclared_tensors_allowed",
        "payload: the declared tensors only",
        "client/release_protocol.py",
        "            validate_structure(payload, declared)",
        "            pass",
    ),
    Mutant(
        "reservation_ignored",
        "one release per key: the reservation",
        "privacy/releases.py",
        "            yield fd is not None",
        "            yield True",
    ),
    Mutant(
        "stored_release_ignored",
        "one release per key: a repeat re-sends the stored bytes",
        "client/release_protocol.py",
        "    stored = releases.load(key)",
        "    stored = None",
    ),
    Mutant(
        "device_budget_ignored",
        "device budget: read from the device",
        "client/device.py",
        "        raw = os.environ.get(EPSILON_ENV)\n",
        "        raw = None\n",
    ),
    Mutant(
        "device_policy_ignored",
        "device budget: refuses runs not private against the server, and audits",
        "client/device.py",
        "        if not p.enabled and not secure:\n",
        "        if False:\n",
    ),
    Mutant(
        "secure_share_masked_twice",
        "secure aggregation: a share is masked and sent once",
        "client/secure_aggregation.py",
        "        del context.state[_SHARE]\n",
        "        pass\n",
        SECURE,
    ),
    Mutant(
        "secure_round_replayed",
        "secure aggregation: a round released once gets no second share",
        "client/secure_aggregation.py",
        "    if ledger.has(key):",
        "    if False:",
        SECURE,
    ),
    Mutant(
        "secure_survivors_from_server",
        "secure aggregation: the device enforces the survivors its charge counted on",
        "client/secure_aggregation.py",
        '        floor = max(keys.integer(counted, "survivors"), '
        'keys.integer(request, "min-survivors"))',
        '        floor = keys.integer(request, "min-survivors")',
        SECURE,
    ),
    Mutant(
        "secagg_unmasked",
        "SecAgg+: masked inputs",
        "privacy/secagg.py",
        "    return torch.from_numpy(words.astype(np.int64))",
        "    return torch.zeros(dim, dtype=torch.int64)",
        SECURE,
    ),
    Mutant(
        "secagg_both_secrets",
        "SecAgg+: never both secrets of one device",
        "privacy/secagg.py",
        "            if self.revealed.setdefault(u, kind) != kind:",
        "            if False:",
        SECURE,
    ),
    Mutant(
        "ddg_noise_share_dropped",
        "distributed discrete Gaussian: each device's noise share",
        "privacy/distributed_dg.py",
        "    noised = rounded + discrete_gaussian(sigma / gamma, dim, noise)",
        "    noised = rounded",
        SECURE,
    ),
    Mutant(
        "bundle_flush_skipped",
        "a bundle's writes flushed before its replies leave: the flush",
        "privacy/durability.py",
        "        if pending:\n            flush(pending)",
        "        pass",
        ("tests/unit/test_durability.py",),
    ),
    Mutant(
        "bundle_flush_after_replies",
        "a bundle's writes flushed before its replies leave: the block around the clients",
        "simulation_bundling.py",
        "        with durability.one_flush() if self.flush_per_call else nullcontext():",
        "        if True:",
        ("tests/unit/test_durability.py",),
    ),
    Mutant(
        "app_gate_open",
        "approved apps only: the gate's check",
        "edge_gate.py",
        "    if not approvals.approves(digest):",
        "    if False:",
    ),
]


def apply(mutant: Mutant, package: Path) -> None:
    path = package / mutant.path
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to mutate is not in {mutant.path} once")
    path.write_text(text.replace(mutant.old, mutant.new))


def run(mutant: Mutant) -> tuple[bool, list[str], float]:
    """(killed, the tests that failed, seconds)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        package = Path(tmp) / "privfed"
        shutil.copytree(REPO / "privfed", package, ignore=shutil.ignore_patterns("__pycache__"))
        apply(mutant, package)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, str(REPO)])}
        found = subprocess.run(
            [sys.executable, "-c", "import privfed; print(privfed.__file__)"],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not found.startswith(str(package)):
            raise SystemExit(f"{mutant.name}: privfed resolves to {found}, not the mutant")
        started = time.perf_counter()
        # Run from the copy's directory (`python -m` puts the working directory first on
        # sys.path) and let pytest append, not prepend, the checkout's root for `tests`.
        tests = [str(REPO / t) for t in mutant.tests]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-rf",
                "--import-mode=append",
                f"--rootdir={REPO}",
                "-c",
                str(REPO / "pyproject.toml"),
                *tests,
            ],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        seconds = time.perf_counter() - started
    failed = sorted(set(re.findall(r"^FAILED \S+::(\S+?)(?:\[| - |$)", out.stdout, re.M)))
    return out.returncode != 0 and bool(failed), failed, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.defence}")
        return 0
    survivors = 0
    print("| mutant | defence removed | killed by |")
    print("|---|---|---|")
    for m in chosen:
        killed, failed, seconds = run(m)
        survivors += not killed
        who = ", ".join(f"`{t}`" for t in failed) if killed else "**survived**"
        print(f"| `{m.name}` | {m.defence} | {who} ({seconds:.0f} s) |", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
