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


def head_names(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """The names of the head's weight and bias in an adapter state (``classifier.weight`` on
    features; peft's ``...classifier.modules_to_save.default.weight`` on an encoder)."""
    found = {
        last: name
        for name in state
        if "classifier" in name.split(".")
        and (last := name.rsplit(".", 1)[-1]) in ("weight", "bias")
    }
    if set(found) != {"weight", "bias"}:
        raise ValueError(f"no single classifier weight and bias in {sorted(state)[:4]}...")
    return found["weight"], found["bias"]


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


class PooledClassifier(torch.nn.Module):
    """An encoder whose mean-pooled last hidden state, centred by a public vector and scaled to
    unit norm, feeds a linear head: the head recipe's classifier on an encoder that adapters
    fine-tune (``model.pooling=mean``). With the encoder unchanged its logits are the head's on
    the cached features (data/features.py), so a head trained there carries over."""

    def __init__(self, encoder: torch.nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("centre", torch.zeros(dim))
        self.classifier = torch.nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: object,
    ):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
        ).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        x = pooled - self.centre
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return SequenceClassifierOutput(logits=self.classifier(x))


def set_centre(model: torch.nn.Module, centre: torch.Tensor) -> None:
    """Give a model's :class:`PooledClassifier` (if it has one) the public centre."""
    for module in model.modules():
        if isinstance(module, PooledClassifier):
            buffer = module.get_buffer("centre")
            with torch.no_grad():
                buffer.copy_(centre.to(buffer.dtype))
