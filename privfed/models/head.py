"""The head recipe's model: a linear classifier on frozen sentence features.

With ``recipe.trains=head`` the encoder is frozen and never changes, so what it computes of an
example is computed once (data/features.py) and a round trains only this head: ``K x d`` weights
and ``K`` biases (1,925 numbers for MiniLM on BBC News, against ~75,000 for LoRA r = 8), a full
forward and backward in microseconds. Its tensors are named as the adapters' head is
(``classifier.*``), so every strategy that aggregates a head aggregates this one.
"""

from __future__ import annotations

import torch


class LinearHead(torch.nn.Module):
    """logits = W x + b on (centred, unit-norm) features x; W and b start at zero."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = torch.nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def prototype_head(
    class_sums: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The head of a nearest-prototype (cosine) classifier: each class's row is its (noised)
    feature sum, normalised and scaled by ``scale`` (the logits' range, which the rounds after
    it start from). A class whose sum is zero gets a zero row."""
    norms = class_sums.norm(dim=1, keepdim=True)
    weight = torch.where(norms > 0, class_sums / norms.clamp_min(1e-12), 0.0) * scale
    return {
        "classifier.weight": weight.to(torch.float32),
        "classifier.bias": (bias if bias is not None else torch.zeros(class_sums.shape[0])).to(
            torch.float32
        ),
    }
