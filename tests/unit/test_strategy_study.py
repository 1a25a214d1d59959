"""The strategy study's statistics and bookkeeping (bench/study_stats.py, bench/strategies.py),
against scipy's own tests; the report from a fake results file (named as such)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import strategies as study  # noqa: E402
from study_stats import (  # noqa: E402
    paired_difference,
    sign_test,
    sign_verdict,
    t_interval,
    verdict,
)


@pytest.mark.parametrize("values", [[0.61, 0.64, 0.58], [0.2, 0.9], np.linspace(0, 1, 7)])
def test_the_interval_is_scipys_student_t(values):
    got = t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, np.mean(values), stats.sem(values))
    assert got.low == pytest.approx(low, rel=1e-12)
    assert got.high == pytest.approx(high, rel=1e-12)


def test_a_paired_difference_is_real_exactly_when_the_paired_t_test_rejects():
    rng = np.random.default_rng(7)
    for _ in range(200):
        seeds = range(int(rng.integers(2, 6)))
        base = {s: float(rng.uniform(0.3, 0.7)) for s in seeds}
        ours = {s: base[s] + float(rng.normal(0.03, 0.03)) for s in seeds}
        diff = paired_difference(ours, base)
        p = stats.ttest_rel([ours[s] for s in seeds], [base[s] for s in seeds]).pvalue
        assert diff.excludes_zero() == (p < 0.05)
        assert verdict(diff).endswith("(real)") == (p < 0.05)


@pytest.mark.parametrize(
    ("diffs", "wins", "losses", "p"),
    [
        ([0.1] * 9, 9, 0, 2 / 2**9),  # all 9 pairs won: 2 * (1/2)^9
        ([0.1] * 8 + [-0.2], 8, 1, 2 * (1 + 9) / 2**9),
        ([0.1] * 7 + [-0.2] * 2, 7, 2, 2 * (1 + 9 + 36) / 2**9),
        ([0.1, 0.0, -0.1, 0.0], 1, 1, 1.0),  # ties are left out
    ],
)
def test_the_sign_test_is_the_exact_binomial_by_hand(diffs, wins, losses, p):
    got = sign_test(diffs)
    assert (got.wins, got.losses) == (wins, losses)
    assert got.p_value == pytest.approx(p, rel=1e-12)
    assert sign_verdict(got) == (
        "no consistent difference" if p >= 0.05 else "consistently higher (real)"
    )
    assert sign_verdict(sign_test([-d for d in diffs])).startswith(
        "no consistent" if p >= 0.05 else "consistently lower"
    )
    assert sign_verdict(sign_test([0.0, 0.0])) == "no untied pairs"


def test_pairs_are_by_seed_and_unpaired_runs_are_left_out():
    diff = paired_difference({0: 0.5, 1: 0.6, 2: 0.9}, {0: 0.4, 1: 0.5})
    assert diff.n == 2 and diff.mean == pytest.approx(0.1)
    assert verdict(paired_difference({0: 0.5}, {0: 0.4})) == "too few paired runs"


def test_a_runs_key_is_what_it_computes_not_where_it_runs():
    cell = study.Cell("lora", 8.0, 0, 1.0, "study")
    base = cell.overrides(study.SETTING, 0.08)
    key = study.key_of(study.composed(base))
    for where in (
        "model.device=cuda",
        "federation.client_resources.num_gpus=0.5",
        "telemetry.plot=false",
        "data.cache_dir=/elsewhere",
        "privacy.user.clip_norm=0.9",  # the user-level block is unused by a record-level run
    ):
        assert study.key_of(study.composed([*base, where])) == key, where
    for what in (
        "seed=1",
        "train.learning_rate=0.04",
        "privacy.epsilon=3",
        "num_rounds=9",
        "privacy.unit=user",
    ):
        assert study.key_of(study.composed([*base, what])) != key, what


def _tune_rows(*runs: tuple[str, float, float]) -> dict:
    return {
        f"{arm}{f}": {"arm": arm, "phase": "tune", "lr_factor": f, "accuracy": acc}
        for arm, f, acc in runs
    }


def test_tuning_picks_each_strategys_best_factor_once_complete():
    done = _tune_rows(
        ("lora", 0.5, 0.6),
        ("lora", 1.0, 0.7),
        ("lora", 2.0, 0.65),
        ("fed_sb", 0.5, 0.5),  # best at the upper edge: 4x is still to try
        ("fed_sb", 1.0, 0.55),
        ("fed_sb", 2.0, 0.8),
        ("fedsvd", 0.5, 0.9),  # incomplete: its default stays
        ("rqm4", 0.5, 0.8),  # best at the lower edge, then inside after 0.25x
        ("rqm4", 1.0, 0.7),
        ("rqm4", 2.0, 0.6),
        ("rqm4", 0.25, 0.75),
    )
    assert study.tuned_factors(done, ["lora", "fed_sb", "fedsvd", "rqm4"]) == {
        "lora": 1.0,
        "fed_sb": 1.0,
        "fedsvd": 1.0,
        "rqm4": 0.5,
    }


def test_the_tuning_grid_grows_past_a_winning_edge_within_its_bounds():
    assert study.tune_grid({}) == [0.5, 1.0, 2.0]
    assert study.tune_grid({0.5: 0.9}) == [0.5, 1.0, 2.0]  # the first grid before any growth
    assert study.tune_grid({0.5: 0.5, 1.0: 0.6, 2.0: 0.8}) == [0.5, 1.0, 2.0, 4.0]
    assert study.tune_grid({0.5: 0.9, 1.0: 0.6, 2.0: 0.2}) == [0.25, 0.5, 1.0, 2.0]
    assert study.tune_grid({0.5: 0.5, 1.0: 0.9, 2.0: 0.8}) == [0.5, 1.0, 2.0]  # inside: done
    rising = {0.5: 0.1, 1.0: 0.2, 2.0: 0.3, 4.0: 0.4, 8.0: 0.5}
    assert study.tune_grid(rising) == [0.5, 1.0, 2.0, 4.0, 8.0]  # 16x is past the bound
    # a tie goes to the factor nearer 1x, so a flat grid does not grow
    assert study.tune_grid({0.5: 0.8, 1.0: 0.8, 2.0: 0.8}) == [0.5, 1.0, 2.0]
    tuned = study.tuned_factors(
        {
            f"r{f}": {"arm": "lora", "phase": "tune", "lr_factor": f, "accuracy": a}
            for f, a in rising.items()
        },
        ["lora"],
    )
    assert tuned == {"lora": 8.0}


def test_a_line_is_stale_once_the_code_would_run_something_else(tmp_path):
    """A line whose cell composes to another key today (a changed default) is not used."""
    plan = study.Plan(study.SETTING)
    cell = study.Cell("fed_sb", 8.0, 0, 1.0, "tune")
    row = {"arm": "fed_sb", "epsilon": 8.0, "seed": 0, "lr_factor": 1.0, "phase": "tune"}
    current = {plan.key(cell): {**row, "key": plan.key(cell)}}
    old = {"0" * 64: {**row, "key": "0" * 64}}  # e.g. before strategy.rank existed
    assert plan.current({**current, **old}) == current
    # another setting (--override) is another study: its lines are not this one's
    other = study.Plan([*study.SETTING, "strategy.rank=8"])
    assert other.current(current) == {}


def _fake_row(arm: str, eps: float | None, seed: int, acc: float, up: float) -> dict:
    """A fake results line (as bench/strategies.py writes them), for the report only."""
    return {
        "key": f"fake-{arm}-{eps}-{seed}",
        "arm": arm,
        "epsilon": eps,
        "seed": seed,
        "lr_factor": 1.0,
        "phase": "study",
        "wall_s": 1.0,
        "accuracy": acc,
        "best_accuracy": acc,
        "accuracy_by_round": [acc / 2, acc],
        "rounds": 2,
        "epsilon_spent": eps or 0.0,
        "epsilon_pld": eps,
        "epsilon_rdp": (eps or 0) * 1.08,
        "noise_multiplier": None if eps is None else 1.5,
        "wall_s_per_round": 3.0,
        "bytes_up_per_client_round": up,
        "bytes_down_per_client_round": 2 * up,
        "aggregation_error": 0.01,
    }


def test_the_report_reads_the_results_file_alone(tmp_path):
    rows = []
    for seed, shift in enumerate([0.00, 0.02, -0.01]):
        for eps in (1.0, 8.0, None):
            rows.append(_fake_row("lora", eps, seed, 0.60 + shift, 300e3))
            rows.append(_fake_row("fed_sb", eps, seed, 0.70 + shift, 20e3))  # +0.10 every seed
            rows.append(_fake_row("rqm4", eps, seed, 0.60 + shift + 0.01 * (-1) ** seed, 40e3))
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn li')
    text = study.report(results, list(study.ARMS))
    fed_sb_eps1 = next(line for line in text.splitlines() if line.startswith("| 1 | fed_sb |"))
    assert "+0.100 [+0.100, +0.100]" in fed_sb_eps1 and "higher accuracy (real)" in fed_sb_eps1
    rqm_eps1 = next(line for line in text.splitlines() if line.startswith("| 1 | rqm4 |"))
    assert "no real difference" in rqm_eps1
    assert "1.000 / 1.080" in fed_sb_eps1  # epsilon by PLD and by RDP
    assert fed_sb_eps1.endswith("| 0.70 / 0.72 / 0.69 |")  # each seed's accuracy, by seed
    # convergence: rounds 1 and 2 of fed_sb at epsilon 1 are acc / 2 and acc (mean 0.703)
    # pooled over the private levels (1 and 8) and 3 seeds: fed_sb won all 6 pairs, p = 2/2^6;
    # rqm4 won 4 and lost 2 (seed 1 at each level)
    pooled = text.split("### Across privacy levels")[1].split("###")[0]
    assert "| fed_sb | 6 / 0 | 0.031 | +0.100 | consistently higher (real) |" in pooled
    assert "| rqm4 | 4 / 2 | 0.688 |" in pooled and "no consistent difference" in pooled
    converged = text.split("### Convergence")[1]
    fed_sb_rounds = next(line for line in converged.splitlines() if "| 1 | fed_sb |" in line)
    assert fed_sb_rounds == "| 1 | fed_sb | 0.352 | 0.703 | +0.352 |"
    for name in (
        "study.md",
        "study.csv",
        "accuracy_vs_epsilon.png",
        "frontier.png",
        "rounds_eps1.png",
        "rounds.png",
    ):
        assert (tmp_path / name).stat().st_size > 0


def test_holm_adjusts_a_family_as_the_textbook_and_statsmodels_do():
    """Holm (1979), by hand: p sorted 0.01, 0.02, 0.03, 0.04 over m = 4 become 0.04, 0.06,
    0.06 (monotone), 0.06; nan is left out of the family."""
    from study_stats import holm, t_test_p

    adjusted = holm({"a": 0.03, "b": 0.01, "c": 0.04, "d": 0.02, "e": float("nan")})
    assert adjusted["b"] == pytest.approx(0.04)
    assert adjusted["d"] == pytest.approx(0.06)
    assert adjusted["a"] == pytest.approx(0.06)
    assert adjusted["c"] == pytest.approx(0.06)
    assert math.isnan(adjusted["e"])
    assert holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}
    # the t-test: scipy's, with the seed as the unit
    values = [0.1, 0.2, 0.15, 0.12, 0.18]
    mean, sd = np.mean(values), np.std(values, ddof=1)
    t = mean / (sd / math.sqrt(5))
    assert t_test_p(values) == pytest.approx(2 * stats.t.sf(t, 4))
    assert math.isnan(t_test_p([0.1])) and math.isnan(t_test_p([0.2, 0.2, 0.2]))


def test_a_baseline_known_by_its_mean_and_range_is_compared_by_welch_with_its_spread():
    """study_stats.welch_p from a baseline's summary equals scipy's Welch test on samples with
    that mean and standard deviation; sd_from_range's constant is the expected range of 5
    normal draws (checked by simulation); and counting the baseline's spread makes a difference
    less certain than a one-sample test against its mean, which takes that mean as exact."""
    from study_stats import sd_from_range, t_test_p, welch_p

    ours = [0.90, 0.91, 0.92, 0.905, 0.915]
    theirs = np.array([0.86, 0.87, 0.88, 0.89, 0.875])
    expected = stats.ttest_ind(ours, theirs, equal_var=False).pvalue
    got = welch_p(ours, float(theirs.mean()), float(theirs.std(ddof=1)), 5)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > t_test_p(ours, float(theirs.mean()))
    draws = np.random.default_rng(0).standard_normal((200_000, 5))
    mean_range = float((draws.max(1) - draws.min(1)).mean())
    assert sd_from_range(0.0, mean_range, 5) == pytest.approx(1.0, abs=0.005)
    with pytest.raises(ValueError, match="n = 11"):
        sd_from_range(0.0, 1.0, 11)
    assert math.isnan(welch_p([0.9], 0.8, 0.01, 5))


@pytest.mark.parametrize("baseline_sd, baseline_n", [(0.02, 5), (0.0, 0)])
@pytest.mark.parametrize("alpha", [0.05, 0.05 / 85])
def test_the_lead_a_test_would_need_is_where_its_p_crosses_the_level(
    baseline_sd, baseline_n, alpha
):
    """study_stats.welch_margin: ours shifted to lead the baseline by the margin gives a p value
    of exactly ``alpha`` under the test the report runs (Welch's with the baseline's spread, or
    one-sample against an exact mean), a little less lead gives more, a little more gives less."""
    from study_stats import t_test_p, welch_margin, welch_p

    ours = np.array([0.90, 0.91, 0.925, 0.905, 0.915])
    base = 0.88

    def p_at(lead: float) -> float:
        shifted = ours - ours.mean() + base + lead
        if baseline_n:
            return welch_p(shifted, base, baseline_sd, baseline_n)
        return t_test_p(shifted, base)

    margin = welch_margin(ours, baseline_sd, baseline_n, alpha)
    assert p_at(margin) == pytest.approx(alpha, rel=1e-9)
    assert p_at(margin * 0.99) > alpha > p_at(margin * 1.01)
    assert math.isnan(welch_margin([0.9], baseline_sd, baseline_n, alpha))


def test_the_frontier_tuner_chooses_on_validation_and_refuses_a_tuning_run_with_test(tmp_path):
    """bench/frontier.py from a fake results file (named as such): the chosen setting is the one
    with the best mean validation accuracy over the tuning seeds, whatever the test numbers; a
    tuning row that carries a test accuracy (a run that evaluated the test split) stops it."""
    import frontier

    fake = frontier.Study(tmp_path / "fake_frontier.jsonl")
    arm, eps, length = "probe", 1.0, 128
    runs = fake.tuning_runs(arm, eps, length)
    assert {r.seed for r in runs} == set(frontier.TUNING_SEEDS)
    assert not set(frontier.TUNING_SEEDS) & set(frontier.EVAL_SEEDS)
    assert all("eval.test=false" in r.overrides() for r in runs)
    for i, r in enumerate(runs):
        fake.rows[fake.key(r)] = {"accuracy": None, "val_accuracy": 0.5 + 0.001 * (i // 2)}
    chosen, val = fake.tuned(arm, eps, length)
    assert chosen == dict(runs[-1].setting) and val == pytest.approx(
        0.5 + 0.001 * (len(runs) // 2 - 1)
    )
    evals = fake.eval_runs(arm, eps, length)
    assert all("eval.test=true" in r.overrides() for r in evals)
    assert {r.seed for r in evals} == set(frontier.EVAL_SEEDS)
    fake.rows[fake.key(runs[0])] = {"accuracy": 0.9, "val_accuracy": 0.5}
    with pytest.raises(AssertionError, match="evaluated the test split"):
        fake.tuned(arm, eps, length)


@pytest.mark.parametrize("results", ["frontier.jsonl", "user_frontier.jsonl"])
def test_the_recorded_studies_still_count_under_todays_config(results):
    """A key added to conf/ changes every composed config: unless the run's key leaves it out
    (where a run happens) or at its neutral value, every recorded run turns stale and the
    report is silently empty (federation.reuse_client_model did that once). One run of each
    arm, phase and epsilon must still have the key it was recorded with."""
    rows = [json.loads(line) for line in (REPO / "bench" / "results" / results).open()]
    sample = {(r["arm"], r.get("phase"), r.get("epsilon")): r for r in rows}
    stale = [
        kind
        for kind, r in sorted(sample.items(), key=str)
        if study.key_of(study.composed(list(r["overrides"]))) != r["key"]
    ]
    assert not stale, f"{len(stale)} of {len(sample)} recorded kinds of run are stale: {stale[:5]}"


def test_the_frontier_pairs_each_adapter_strategy_with_lora_by_seed():
    """bench/frontier.py's section for the seed papers' claims, from a fake cell table (named
    as such): the paired mean difference over the seeds both have, and the Holm p it is given."""
    import frontier

    fake_cells = {
        ("lora", 3.0, 32, "iid"): {s: {"accuracy": a} for s, a in enumerate([0.5, 0.6, 0.7, 0.4])},
        ("fedsvd", 3.0, 32, "iid"): {s: {"accuracy": a} for s, a in enumerate([0.6, 0.8, 0.8])},
    }
    key = ("lora", "fedsvd", 3.0, 32, "iid")
    lines = frontier.adapter_lines(fake_cells, {key: 0.01}, {key: 0.03})
    (row,) = [line for line in lines if "| fedsvd |" in line]
    assert "+0.133 (n = 3, p = 0.030, real)" in row  # seeds 0-2 only: lora's seed 3 has no pair
    assert row.endswith("| — |")  # the fake rows say nothing of their upload
    for cell, sent in (("lora", 300e3), ("fedsvd", 150e3)):
        for r in fake_cells[(cell, 3.0, 32, "iid")].values():
            r["bytes_up_per_client_round"] = sent
    (row,) = [
        line
        for line in frontier.adapter_lines(fake_cells, {key: 0.01}, {key: 0.03})
        if "| fedsvd |" in line
    ]
    assert row.endswith("| 150.0 kB (×0.50) |")
    assert frontier.adapter_lines(fake_cells, {}, {}) == []  # nothing to compare: no section
