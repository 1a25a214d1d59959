"""What the server does in one round beyond the strategy (server/loop.py)."""

from __future__ import annotations

import pytest

from ..helpers import TINY, compose_raw

pytestmark = pytest.mark.usefixtures("flower_task_identity")


class _FakeGrid:
    """A fake for this test only: three nodes, and nothing comes back from them."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13]


@pytest.mark.parametrize(("strategy", "test_split"), [("lora", False), ("fedmentor", True)])
def test_a_round_passes_over_the_validation_split_once(tmp_path, monkeypatch, strategy, test_split):
    """FedMentor's utility signal and the metrics line read the same state: one pass over the
    validation split per round (it was two: seconds per round on MiniLM), and one over the test
    split only where it is reported."""
    from privfed.cli import prepare_run
    from privfed.server import loop
    from privfed.telemetry.run_dir import RunDirectory

    prepared = prepare_run(
        compose_raw(*TINY, f"strategy={strategy}", f"eval.test={str(test_split).lower()}")
    )
    monkeypatch.setattr(loop, "send_and_receive", lambda *args, **kwargs: [])
    passes: list[int] = []
    evaluate = loop.evaluate

    def counted(model, state, split, batch_size, device):
        passes.append(len(split))
        return evaluate(model, state, split, batch_size, device)

    monkeypatch.setattr(loop, "evaluate", counted)
    run = loop.Federation(_FakeGrid(), prepared.cfg, RunDirectory(tmp_path), prepared)  # type: ignore[arg-type]
    row = run.play_round(1)
    whole = [len(prepared.data.validation)] + ([len(prepared.data.test)] if test_split else [])
    # FedMentor also asks for the accuracy on each domain's labels: subsets, not whole passes
    assert [
        n for n in passes if n in (len(prepared.data.validation), len(prepared.data.test))
    ] == whole
    cfg = prepared.cfg
    again = evaluate(prepared.model, run.state, prepared.data.validation, 64, cfg.model.device)
    assert (row["val_accuracy"], row["val_loss"]) == pytest.approx(again)
