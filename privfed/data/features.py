"""Sentence features of the frozen encoder, computed once per example and input length.

The head recipe (``recipe.trains=head``) trains a linear classifier on what the frozen encoder
makes of each example. The encoder never changes in that recipe, so each example's feature is
computed once and cached on disk beside the tokens (keyed by the encoder, the input length and
the token ids): a run, its clients and every later run read the cache, and a head-only round
costs a matrix product.

The feature is the encoder's mean-pooled last hidden state (the pooling all-MiniLM-L6-v2 was
trained with), centred by the mean of the *public validation split* and scaled to unit L2 norm.
Unit norm bounds each example's contribution to anything it takes part in (a prototype sum, a
gradient of the head) without clipping; centring removes the direction every sentence embedding
shares, which otherwise dominates cosine similarity. The centre is computed from public data
only (the validation split, on the server's side), never from a client's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from privfed.config import ModelConfig
from privfed.data.datasets import TokenizedSplit
from privfed.randomness import public_seed
from privfed.telemetry.console import CONSOLE, bars_enabled


@dataclass(frozen=True)
class FeatureSplit:
    """Features and labels of one split (the head recipe's data), as CPU tensors."""

    features: torch.Tensor  # (N, d) float32
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | list[int]) -> FeatureSplit:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return FeatureSplit(self.features[idx], self.labels[idx])

    def inputs(self, sl: slice | None = None) -> tuple[torch.Tensor, ...]:
        """What the model takes, for the rows ``sl``."""
        return (self.features if sl is None else self.features[sl],)

    def tensor_dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.features, self.labels)


def _key(cfg: ModelConfig, seed: int, tokens: TokenizedSplit) -> str:
    # A random tiny encoder depends on the run seed; a pretrained one does not (one cache).
    encoder = [cfg.source, cfg.path, cfg.max_length, cfg.tiny.model_dump() if cfg.tiny else None]
    if cfg.source == "tiny_bert":
        encoder.append(public_seed(seed, "model.init"))
    h = hashlib.sha256(json.dumps(["features/v1", encoder]).encode())
    h.update(tokens.input_ids.numpy().tobytes())
    h.update(tokens.attention_mask.numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def encode(
    cfg: ModelConfig, tokens: TokenizedSplit, seed: int, vocab_size: int, batch_size: int = 64
) -> torch.Tensor:
    """The frozen encoder's mean-pooled last hidden state of every row, (N, hidden)."""
    from privfed.models.backbone import backbone

    encoder = backbone(cfg, 2, seed, vocab_size).base_model
    if not isinstance(encoder, torch.nn.Module):
        raise TypeError(f"peft's base_model is a {type(encoder).__name__}, not a module")
    encoder.to(cfg.device).eval()
    chunks: Iterable[int] = range(0, len(tokens), batch_size)
    if bars_enabled():
        from rich.progress import track

        chunks = track(chunks, description=f"encoding {len(tokens)} texts", console=CONSOLE)
    out = []
    for start in chunks:
        ids = tokens.input_ids[start : start + batch_size].to(cfg.device)
        mask = tokens.attention_mask[start : start + batch_size].to(cfg.device)
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).float().cpu())
    return torch.cat(out)


def cached_features(
    cfg: ModelConfig, tokens: TokenizedSplit, seed: int, vocab_size: int, cache_dir: str | None
) -> torch.Tensor:
    """:func:`encode`, computed once and kept in ``cache_dir`` (an atomic write)."""
    cache = Path(cache_dir) / f"features-{_key(cfg, seed, tokens)}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        return torch.load(cache)
    features = encode(cfg, tokens, seed, vocab_size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{np.random.randint(1 << 30)}.tmp")
        torch.save(features, tmp)
        tmp.replace(cache)
    return features


def normalised(features: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Centred by ``centre`` (public), then scaled to unit L2 norm."""
    x = features - centre
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
