"""Partition the training split across clients with flwr-datasets partitioners.

``iid`` (IidPartitioner), ``dirichlet`` (DirichletPartitioner over labels, concentration
``alpha``), ``label`` (PathologicalPartitioner: ``classes_per_client`` labels per client).
Partitions are index arrays into the training split, deterministic in the run seed, so the server
(which needs every client's size to calibrate noise) and each client compute the same ones.
"""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)

from privfed.config import PartitionerConfig
from privfed.randomness import public_seed


def partition_indices(
    labels: np.ndarray, num_partitions: int, cfg: PartitionerConfig, seed: int
) -> list[np.ndarray]:
    seed = public_seed(seed, "data.partition") % 2**32  # the partitioners take a 32-bit seed
    n = len(labels)
    if num_partitions > n:
        raise ValueError(
            f"federation.num_clients: {num_partitions} clients for {n} training examples"
        )
    table = datasets.Dataset.from_dict(
        {"label": np.asarray(labels, dtype=np.int64), "row": np.arange(n, dtype=np.int64)}
    )
    if cfg.name == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        table = table.shuffle(seed=seed)
    elif cfg.name == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=max(1, min(10, n // (4 * num_partitions))),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        num_classes = len(np.unique(labels))
        if cfg.classes_per_client > num_classes:
            raise ValueError(
                f"data.partitioner.classes_per_client: {cfg.classes_per_client} is more than "
                f"the {num_classes} classes"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = table
    parts = [
        np.sort(np.asarray(partitioner.load_partition(i)["row"])) for i in range(num_partitions)
    ]
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"data.partitioner: {cfg.name} left {len(empty)} of {num_partitions} clients without "
            "data; use fewer clients or another partitioner"
        )
    return parts
