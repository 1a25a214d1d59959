"""The federation's data: train, validation and test splits and each client's partition.

Deterministic in the run config, so the server (which needs partition sizes to calibrate the
noise, and the held-out splits to evaluate) and every client (its own partition) build the same
view. Built once per process (Ray actors reuse it across rounds). The splits are tokens, or with
``recipe.trains=head`` the frozen encoder's features (data/features.py), computed once and
cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

from privfed.config import RunConfig
from privfed.data.datasets import TokenizedSplit, load_text_dataset, tokenize, train_test_split
from privfed.data.features import FeatureSplit, cached_features, normalised
from privfed.data.partition import partition_indices
from privfed.models.backbone import load_tokenizer

Split = TokenizedSplit | FeatureSplit


class ExtraRecords(Protocol):
    """Records added to each client's data from outside it (an audit's gradient canaries,
    audit/canaries.py). They are records: they count in the client's dataset size, so in its
    sampling rate and its ledger."""

    def count(self, partition_id: int) -> int: ...

    def rows(self, partition_id: int, seq_len: int) -> TokenizedSplit: ...


@dataclass(frozen=True)
class FederatedData:
    train: Split
    validation: Split  # public, on the server: what every selection reads
    test: Split
    partitions: list[np.ndarray]
    label_names: list[str]
    vocab_size: int
    extra: ExtraRecords | None = None  # records added to each client's (an audit's canaries)
    # the frozen encoder's features of the training split, where a recipe needs them beside
    # the tokens (prototypes before adapters), and their public centre (data/features.py)
    train_features: FeatureSplit | None = None
    centre: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def client(self, partition_id: int) -> Split:
        """A client's training data, with the records added to it (an audit's canaries)."""
        real = self.client_examples(partition_id)
        if self.extra is None:
            return real
        if not isinstance(real, TokenizedSplit):  # the config refuses an audit of a head
            raise TypeError("added records are token rows; this run trains a head on features")
        return real.concat(self.extra.rows(partition_id, real.input_ids.shape[1]))

    def client_features(self, partition_id: int) -> FeatureSplit:
        """A client's examples as the frozen encoder's features (its prototypes' input)."""
        if isinstance(self.train, FeatureSplit):
            return self.train.subset(self.partitions[partition_id])
        if self.train_features is None:
            raise ValueError("this run computes no features (recipe.prototypes is off)")
        return self.train_features.subset(self.partitions[partition_id])

    def client_examples(self, partition_id: int) -> Split:
        """A client's real examples only."""
        return self.train.subset(self.partitions[partition_id])

    def sizes(self) -> list[int]:
        """Each client's dataset size as DP-SGD sees it (added records count: they are records)."""
        extra = self.extra
        return [len(p) + (extra.count(i) if extra else 0) for i, p in enumerate(self.partitions)]


def _key(cfg: RunConfig) -> str:
    return json.dumps(
        {
            "data": cfg.data.model_dump(),
            "model": [cfg.model.source, cfg.model.path, cfg.model.max_length],
            "features": [cfg.recipe.trains, cfg.recipe.prototypes, cfg.model.pooling],
            "clients": cfg.federation.num_clients,
            "seed": cfg.seed,
        },
        sort_keys=True,
    )


def federated_data(cfg: RunConfig) -> FederatedData:
    return _build(_key(cfg), cfg.model_dump_json(by_alias=True))


@lru_cache(maxsize=2)
def _build(_cache_key: str, cfg_json: str) -> FederatedData:
    cfg = RunConfig.model_validate_json(cfg_json)
    raw = load_text_dataset(cfg.data)
    train_idx, val_idx, test_idx = train_test_split(
        raw.labels, cfg.data.test_fraction, cfg.data.split_seed, cfg.data.validation_fraction
    )
    tokenizer = load_tokenizer(cfg.model)
    tokens = tokenize(raw.texts, raw.labels, tokenizer, cfg.model.max_length, cfg.data.cache_dir)
    rows: Split = tokens
    features, centre = None, None
    if cfg.recipe.trains == "head" or cfg.recipe.prototypes or cfg.model.pooling == "mean":
        raw_features = cached_features(
            cfg.model, tokens, cfg.seed, len(tokenizer), cfg.data.cache_dir
        )
        # centred by the public validation split's mean; without one, not centred (the
        # training split is the clients' private data)
        centre = torch.zeros(raw_features.shape[1])
        if len(val_idx):
            centre = raw_features[torch.as_tensor(val_idx)].mean(0)
        features = FeatureSplit(normalised(raw_features, centre), tokens.labels)
        if cfg.recipe.trains == "head":
            rows = features
    train, validation, test = (rows.subset(i) for i in (train_idx, val_idx, test_idx))
    train_features = features.subset(train_idx) if features is not None else None
    parts = partition_indices(
        train.labels.numpy(), cfg.federation.num_clients, cfg.data.partitioner, cfg.seed
    )
    return FederatedData(
        train,
        validation,
        test,
        parts,
        raw.label_names,
        len(tokenizer),
        None,  # an audit adds its canaries (audit/canaries.py, audited_data)
        train_features if cfg.recipe.trains != "head" else None,
        centre,
    )
