"""Central evaluation of the global adapter on the held-out test split."""

from __future__ import annotations

import torch

from privfed.data.datasets import TokenizedSplit
from privfed.models.backbone import AdapterState, forward_logits, load_adapter_state


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, state: AdapterState, test: TokenizedSplit, batch_size: int, device: str
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` with ``state`` loaded."""
    load_adapter_state(model, state)
    model.to(device)
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(test), batch_size):
        sl = slice(start, start + batch_size)
        ids, mask = test.input_ids[sl].to(device), test.attention_mask[sl].to(device)
        labels = test.labels[sl].to(device)
        logits = forward_logits(model, ids, mask)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    n = len(test)
    return correct / n, loss_sum / n
