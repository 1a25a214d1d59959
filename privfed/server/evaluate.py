"""Central evaluation of the global adapter on a held-out split (validation or test)."""

from __future__ import annotations

import torch

from privfed.data.federated import Split
from privfed.models.backbone import forward_inputs, load_adapter_state
from privfed.tensors import State


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, state: State, split: Split, batch_size: int, device: str
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` with ``state`` loaded; (nan, nan) on an
    empty split."""
    load_adapter_state(model, state)
    model.to(device)
    model.eval()
    n = len(split)
    if n == 0:
        return float("nan"), float("nan")
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        labels = split.labels[sl].to(device)
        logits = forward_inputs(model, tuple(x.to(device) for x in split.inputs(sl)))
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / n, loss_sum / n
