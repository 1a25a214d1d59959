"""The federation's data: tokenised train/test splits and each client's partition.

Deterministic in the run config, so the server (which needs partition sizes to calibrate the
noise, and the test split to evaluate) and every client (its own partition) build the same view.
Built once per process (Ray actors reuse it across rounds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from privfed.audit.canaries import CanaryPlan
from privfed.config import RunConfig
from privfed.data.datasets import TokenizedSplit, load_text_dataset, tokenize, train_test_split
from privfed.data.partition import partition_indices
from privfed.models.backbone import load_tokenizer


@dataclass(frozen=True)
class FederatedData:
    train: TokenizedSplit
    test: TokenizedSplit
    partitions: list[np.ndarray]
    label_names: list[str]
    vocab_size: int
    canaries: CanaryPlan | None = None  # an audit run's canaries (privfed/audit)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def client(self, partition_id: int) -> TokenizedSplit:
        """A client's training data, with its included canaries in an audit run."""
        real = self.client_examples(partition_id)
        if self.canaries is None:
            return real
        return real.concat(self.canaries.rows(partition_id, real.input_ids.shape[1]))

    def client_examples(self, partition_id: int) -> TokenizedSplit:
        """A client's real examples only."""
        return self.train.subset(self.partitions[partition_id])

    def sizes(self) -> list[int]:
        """Each client's dataset size as DP-SGD sees it (canaries count: they are records)."""
        extra = [0] * len(self.partitions)
        if self.canaries is not None:
            extra = [len(self.canaries.included_in(i)) for i in range(len(self.partitions))]
        return [len(p) + e for p, e in zip(self.partitions, extra, strict=True)]


def _key(cfg: RunConfig) -> str:
    return json.dumps(
        {
            "data": cfg.data.model_dump(),
            "model": [cfg.model.source, cfg.model.path, cfg.model.max_length],
            "clients": cfg.federation.num_clients,
            "seed": cfg.seed,
            "audit": cfg.audit.model_dump() if cfg.audit.enabled else None,
        },
        sort_keys=True,
    )


def federated_data(cfg: RunConfig) -> FederatedData:
    return _build(_key(cfg), cfg.model_dump_json(by_alias=True))


@lru_cache(maxsize=2)
def _build(_cache_key: str, cfg_json: str) -> FederatedData:
    cfg = RunConfig.model_validate_json(cfg_json)
    raw = load_text_dataset(cfg.data, cfg.seed)
    train_idx, test_idx = train_test_split(raw.labels, cfg.data.test_fraction, cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    tokens = tokenize(raw.texts, raw.labels, tokenizer, cfg.model.max_length, cfg.data.cache_dir)
    train, test = tokens.subset(train_idx), tokens.subset(test_idx)
    parts = partition_indices(
        train.labels.numpy(), cfg.federation.num_clients, cfg.data.partitioner, cfg.seed
    )
    # record canaries in the clients' data for a record-level audit; a user-level audit's
    # canaries are devices the server adds (audit/user_canaries.py), not data
    record_audit = cfg.audit.enabled and not cfg.privacy.user_level
    canaries = CanaryPlan(cfg.audit, cfg.federation.num_clients) if record_audit else None
    return FederatedData(train, test, parts, raw.label_names, len(tokenizer), canaries)
