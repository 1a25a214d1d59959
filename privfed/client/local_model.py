"""The model a client trains in a round, built once per worker process.

As in pfl-research's simulator, the frozen backbone, the peft wrapping and Opacus' per-sample
gradient hooks live for the worker's lifetime (a Ray actor, a SuperNode's ClientApp process);
a client call swaps in only the broadcast adapter state. Building them per call (a copy of the
whole encoder, ~0.1 s on MiniLM, and Opacus' hooks, ~30 ms) cost far more than the 1-2 examples
a cross-device client trains on.

Isolation is what makes this safe, and :func:`local_model` owns it: on checkout every adapter
tensor is reset to its built value and then loaded from the broadcast; on return (also after an
error) the adapter tensors are reset again and every gradient, per-sample gradient and stored
activation is dropped, so nothing of a client (its trained state, its gradients, what its data
made the model hold) is left for the next one. Optimizers and random streams are per call by
construction (privacy/dp_sgd.py). After an error mid-training the model is discarded, not reused.
A checkout while the worker's model is in use (threads) gets a model of its own.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS

from privfed.config import RunConfig
from privfed.data.federated import federated_data
from privfed.models.backbone import adapter_names, copy_into
from privfed.privacy.dp_sgd import per_sample_module
from privfed.strategies.base import AdapterStrategy

# What Opacus leaves on a module between a forward and its backward (an error in between).
_MODULE_ATTRS = ("activations", "max_batch_len")


@dataclass
class WorkerModel:
    """One built model with its adapter tensors' built values, and Opacus' hooks for the
    trainable set last used (kept, disabled between calls)."""

    model: torch.nn.Module
    names: InitVar[list[str]]  # every adapter tensor (what the server broadcasts)
    params: dict[str, torch.nn.Parameter] = field(init=False)  # those tensors, by name
    built: dict[str, torch.Tensor] = field(init=False)
    modules: list[torch.nn.Module] = field(init=False)  # walked once, not per call
    busy: bool = False
    _hooks: Any = None  # Opacus' GradSampleModule: hooks disabled between calls
    _hooks_key: tuple | None = None

    def __post_init__(self, names: list[str]) -> None:
        every = dict(self.model.named_parameters())
        self.params = {n: every[n] for n in names}
        self.built = {n: p.detach().clone() for n, p in self.params.items()}
        self.modules = list(self.model.modules())

    def load(self, strategy: AdapterStrategy, global_state: dict) -> None:
        self.reset()
        copy_into(self.params, global_state)
        for name, param in self.params.items():
            param.requires_grad_(strategy.trainable(name))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A copy of every adapter tensor's value now (what the call trained)."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    def reset(self) -> None:
        """The adapter tensors at their built values; no gradient or Opacus state anywhere."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.built[name])
                param.grad = None
                for attr in (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad"):
                    if hasattr(param, attr):
                        delattr(param, attr)
                if self._hooks is not None:
                    param._forward_counter = 0  # type: ignore[attr-defined]  # Opacus reads it
        for module in self.modules:
            for attr in _MODULE_ATTRS:
                if attr in module.__dict__:
                    delattr(module, attr)

    def hooks(self, mode: str, clip: float) -> torch.nn.Module:
        """Opacus' per-sample gradient module for the tensors trainable now, hooks enabled;
        made once per trainable set (and mode, and the clip of ghost clipping)."""
        trainable = tuple(n for n, p in self.params.items() if p.requires_grad)
        key = (trainable, mode, clip if mode == "ghost" else None)
        if self._hooks_key != key:
            self.close_hooks()
            self._hooks = per_sample_module(self.model, mode, clip)
            self._hooks_key = key
        self._hooks.enable_hooks()
        return self._hooks

    def release_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.disable_hooks()

    def close_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks._close()  # remove hooks and per-sample buffers
        self._hooks, self._hooks_key = None, None


_LOCK = threading.Lock()
_POOL: OrderedDict[tuple, WorkerModel] = OrderedDict()
_POOL_SIZE = 2  # models kept per process (two runs side by side in one test process at most)


def _pool_key(cfg: RunConfig, strategy: AdapterStrategy, data: Any) -> tuple:
    centre = None
    if data.centre is not None:
        centre = hashlib.sha256(data.centre.numpy().tobytes()).hexdigest()
    return (
        strategy.model_config.model_dump_json(),
        strategy.parameterisation,
        cfg.seed,
        data.num_classes,
        data.vocab_size,
        centre,
    )


def _build(strategy: AdapterStrategy, data: Any) -> WorkerModel:
    model = strategy.new_model(data)
    return WorkerModel(model, adapter_names(model))


@contextmanager
def local_model(
    cfg: RunConfig, strategy: AdapterStrategy, global_state: dict, keep: bool = True
) -> Iterator[WorkerModel]:
    """The worker's model holding the broadcast adapter state, only what the strategy trains
    with gradients, for one client call; scrubbed on return (see the module's docstring).
    ``keep=False``: a model built for this call alone (what every call did before)."""
    data = federated_data(cfg)
    key = _pool_key(cfg, strategy, data)
    with _LOCK:
        worker = _POOL.get(key) if keep else None
        if worker is not None and worker.busy:
            worker, keep = None, False  # in use by another thread: one of its own
        if worker is not None:
            _POOL.move_to_end(key)
            worker.busy = True
    if worker is None:
        worker = _build(strategy, data)
        if keep:
            worker.busy = True
            with _LOCK:
                _POOL[key] = worker
                while len(_POOL) > _POOL_SIZE:
                    _POOL.popitem(last=False)
    failed = True
    try:
        worker.load(strategy, global_state)
        yield worker
        failed = False
    finally:
        if failed or not keep:  # state mid-training is not trusted: build again next time
            worker.close_hooks()
            with _LOCK:
                if _POOL.get(key) is worker:
                    del _POOL[key]
        worker.release_hooks()
        worker.reset()
        worker.busy = False


def clear() -> None:
    """Drop the models this process keeps (tests; a worker never needs to)."""
    with _LOCK:
        for worker in _POOL.values():
            worker.close_hooks()
        _POOL.clear()
