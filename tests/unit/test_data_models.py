"""Datasets, partitions, backbones: BBC News offline, local HF datasets and models, partitioners."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privfed.config import PartitionerConfig
from privfed.data.datasets import load_bbc_news, load_text_dataset, train_test_split
from privfed.data.partition import partition_indices
from privfed.models.backbone import adapter_names, build_model, minilm_path

from ..helpers import TINY, run_config


def test_bbc_news_is_offline_and_complete():
    data = load_bbc_news()
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(data.texts) == 2225 and np.bincount(data.labels).tolist() == [
        510,
        386,
        417,
        511,
        401,
    ]


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), 100)
    train, _, test = train_test_split(labels, 0.2, seed=3)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 500
    assert np.bincount(labels[test]).tolist() == [20] * 5
    assert np.array_equal(test, train_test_split(labels, 0.2, seed=3)[2])


@pytest.mark.parametrize("name", ["iid", "dirichlet", "label"])
def test_partitions_cover_the_training_split_once(name):
    labels = np.repeat(np.arange(5), 60)
    parts = partition_indices(
        labels, 6, PartitionerConfig(name=name, alpha=0.5, classes_per_client=2), 0
    )
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) == 300 and all(len(p) for p in parts)
    if name == "label":
        assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    again = partition_indices(
        labels, 6, PartitionerConfig(name=name, alpha=0.5, classes_per_client=2), 0
    )
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_hf_dataset_from_a_local_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        "review,stars\n"
        + "".join(f"text number {i},{'good' if i % 3 else 'bad'}\n" for i in range(30))
    )
    cfg = run_config(
        "data=hf", f"data.path={path}", "data.text_column=review", "data.label_column=stars"
    )
    data = load_text_dataset(cfg.data)
    assert data.label_names == ["bad", "good"] and len(data.texts) == 30
    assert data.labels.tolist()[:3] == [0, 1, 1]


def test_hf_dataset_with_a_missing_column_names_it(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb,1\n")
    cfg = run_config("data=hf", f"data.path={path}", "data.label_column=topic")
    with pytest.raises(ValueError, match="data.label_column: 'topic' is not a column"):
        load_text_dataset(cfg.data)


def test_hf_model_from_a_local_folder_gets_lora_and_a_head():
    cfg = run_config("model=hf", f"model.path={minilm_path()}", "model.lora.r=2")
    model = build_model(cfg.model, num_labels=3, seed=0, vocab_size=30522)
    names = adapter_names(model)
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert all(("lora_" in n) or ("classifier" in n) for n in names)  # the backbone is frozen


def test_unmatched_lora_targets_are_refused():
    cfg = run_config("model=tiny_bert", "model.lora.target_modules=[nope]")
    with pytest.raises(ValueError):
        build_model(cfg.model, num_labels=3, seed=0, vocab_size=30522)


def test_tokenising_in_chunks_equals_one_call(tmp_path):
    """Tokenisation runs in chunks of 256 (for a progress bar): the same tensors as one call."""
    from privfed.data.datasets import tokenize
    from privfed.models.backbone import load_tokenizer

    tokenizer = load_tokenizer(run_config(*TINY).model)
    texts = [f"text number {i} " * (1 + i % 40) for i in range(600)]
    labels = np.arange(600) % 5
    chunked = tokenize(texts, labels, tokenizer, 64, None)
    whole = tokenizer(
        texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt"
    )
    assert torch.equal(chunked.input_ids, whole["input_ids"].long())
    assert torch.equal(chunked.attention_mask, whole["attention_mask"].long())
