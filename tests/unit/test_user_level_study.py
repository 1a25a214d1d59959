"""bench/user_level.py: each cell composes to the run it names (the unit, epsilon, population
and sampling rate the study claims), and the report reads a fake results file (named as such)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import user_level  # noqa: E402
from strategies import composed, key_of  # noqa: E402


def _args(**kw):
    base = dict(populations=[100, 1000], units=["record", "user"], epsilons=[1.0, None], seeds=[0])
    return argparse.Namespace(**{**base, **kw})


def test_the_grid_has_one_non_private_arm_per_population_and_both_units_per_epsilon():
    cells = user_level.cells(_args())
    assert [(c.population, c.unit, c.epsilon) for c in cells] == [
        (100, "record", 1.0),
        (100, "user", 1.0),
        (100, "none", None),
        (1000, "record", 1.0),
        (1000, "user", 1.0),
        (1000, "none", None),
    ]


@pytest.mark.parametrize("unit", ["record", "user", "none"])
def test_a_cell_composes_to_the_run_it_names(unit):
    cell = user_level.Cell(1000, unit, None if unit == "none" else 3.0, 1)
    cfg = composed(cell.overrides(rounds=20))
    fed, privacy = cfg["federation"], cfg["privacy"]
    assert (fed["num_clients"], fed["clients_per_round"]) == (1000, 100)  # q = 0.1
    assert cfg["num_rounds"] == 20 and cfg["seed"] == 1
    assert cfg["data"]["partitioner"]["name"] == "iid"
    if unit == "record":
        assert privacy["unit"] == "record" and privacy["enabled"] and privacy["epsilon"] == 3.0
    elif unit == "user":
        assert privacy["unit"] == "user" and not privacy["enabled"]
        assert privacy["user"]["epsilon"] == 3.0
    else:
        assert privacy["unit"] == "record" and not privacy["enabled"]


def test_every_cell_has_its_own_key():
    cells = user_level.cells(_args(seeds=[0, 1]))
    keys = {key_of(composed(c.overrides(rounds=20))) for c in cells}
    assert len(keys) == len(cells)


def test_the_report_from_a_fake_results_file(tmp_path):
    """Fake results (unit test): the user-level row's noise ratio is sigma sqrt(d) / qN, with d
    from the record-level row's bytes."""
    results = tmp_path / "user_level.jsonl"
    common = {"wall_s_per_round": 10.0, "accuracy_by_round": [0.5]}
    rows = [
        {
            "key": "a",
            "population": 1000,
            "unit": "record",
            "epsilon": 8.0,
            "seed": 0,
            "accuracy": 0.30,
            "epsilon_spent": 3.9,
            "noise_multiplier": 2.7,
            "bytes_up_per_client_round": 4 * 40_000,
            **common,
        },
        {
            "key": "b",
            "population": 1000,
            "unit": "user",
            "epsilon": 8.0,
            "seed": 0,
            "accuracy": 0.25,
            "epsilon_spent": 0.0,
            "epsilon_user": 7.99,
            "user_noise_multiplier": 0.5,
            "user_clip_norm": 0.5,
            "bytes_up_per_client_round": None,
            **common,
        },
        {
            "key": "c",
            "population": 1000,
            "unit": "user",
            "epsilon": 8.0,
            "seed": 1,
            "accuracy": 0.35,
            "epsilon_spent": 0.0,
            "epsilon_user": 7.99,
            "user_noise_multiplier": 0.5,
            "user_clip_norm": 0.5,
            "bytes_up_per_client_round": None,
            **common,
        },
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = user_level.report(results)
    user_row = next(line for line in text.splitlines() if "| user |" in line)
    assert f"{0.5 * 40_000**0.5 / 100:.2f} (σ√d / qN" in user_row
    assert "0.300 (n = 1)" in text and "| 2 |" in user_row
    assert (tmp_path / "user_level.png").stat().st_size > 10_000
