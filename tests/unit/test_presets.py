"""Each preset (privfed/conf/preset/) is, key for key, the frontier arm it names: a preset that
drifted from what bench/frontier.py measured would carry numbers it never earned."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import compose_raw

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import frontier  # noqa: E402

GD = (("recipe.prototype_share", 0.8), ("train.learning_rate", 0.3))
GD_EVEN = (("recipe.prototype_share", 0.5), ("train.learning_rate", 1.0))
# preset -> (frontier arm, input length, setting chosen on validation, the epsilons it is for)
PRESETS = {
    "dp_prototypes_gd": ("prototypes_gd", 256, GD, [3.0, 8.0]),
    "dp_prototypes_gd_even": ("prototypes_gd", 256, GD_EVEN, [1.0]),
    "probe": ("probe", 256, (("num_rounds", 100), ("train.learning_rate", 10.0)), [None]),
    # the frontier's recipes before prototypes + GD ran at 256 tokens; each the best of its arm
    "dp_prototypes": ("prototypes", 256, (), [1.0, 3.0]),
    "dp_probe": ("probe", 256, (("num_rounds", 30), ("train.learning_rate", 3.0)), [8.0]),
}
CASES = [(preset, eps) for preset, spec in sorted(PRESETS.items()) for eps in spec[3]]
WHERE_IT_RUNS = {"telemetry", "eval", "hydra"}  # not what a run computes


def test_every_preset_file_is_listed_here():
    files = {p.stem for p in (REPO / "privfed" / "conf" / "preset").glob("*.yaml")}
    assert files == set(PRESETS)


@pytest.mark.parametrize(("preset", "epsilon"), CASES)
def test_a_preset_composes_to_its_frontier_arm(preset, epsilon):
    arm, length, setting, _ = PRESETS[preset]
    run = frontier.Run(arm, epsilon, length, "iid", 0, setting, "eval")
    measured = compose_raw(*run.overrides())
    privacy = "privacy=none" if epsilon is None else f"privacy.epsilon={epsilon}"
    one_override = compose_raw(f"preset={preset}", privacy)
    for key in sorted((set(measured) | set(one_override)) - WHERE_IT_RUNS):
        assert one_override.get(key) == measured.get(key), key


def test_a_preset_leaves_the_rest_overridable():
    raw = compose_raw("preset=dp_prototypes", "model.max_length=64", "federation.num_clients=4")
    assert raw["model"]["max_length"] == 64 and raw["federation"]["num_clients"] == 4


# epsilon -> the preset README names as the frontier's recipe there
WINNERS = {
    1.0: "dp_prototypes_gd_even",
    3.0: "dp_prototypes_gd",
    8.0: "dp_prototypes_gd",
    None: "probe",
}


@pytest.mark.parametrize("epsilon", list(WINNERS))
def test_the_preset_readme_names_at_an_epsilon_is_the_frontiers_recipe_there(epsilon):
    """From the committed results (bench/results/frontier.jsonl): the arm, length and setting
    with the best tuned validation accuracy at ``epsilon`` are the preset's, so README's one
    override runs what won (a new winner fails this until the preset and README follow)."""
    study = frontier.Study()
    best = frontier.best_arm(study, frontier.cells(study), epsilon)
    assert best is not None
    arm, length, setting, _ = best
    expected_arm, expected_length, expected_setting, meant_for = PRESETS[WINNERS[epsilon]]
    assert (arm, length, tuple(setting.items())) == (
        expected_arm,
        expected_length,
        expected_setting,
    )
    assert epsilon in meant_for
