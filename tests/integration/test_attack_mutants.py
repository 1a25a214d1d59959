"""Every defence the attack tests guard is removed once, in a copy of the package, and the
attack tests must then fail (scripts/attack_mutants.py): a test that passes against a broken
defence guards nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_no_mutant_of_a_defence_survives_the_attack_tests():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "attack_mutants.py")],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) >= 13 and not any("survived" in row for row in rows), out.stdout
