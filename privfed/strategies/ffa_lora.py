"""FFA-LoRA (``strategy=ffa_lora``): "Improving LoRA in Privacy-preserving Federated Learning"
(Sun et al., ICLR 2024).

``A`` is initialised once from the run seed, identically on every client, and frozen; ``B``
starts at zero and is the only trainable LoRA factor. Clients send ``B_k`` (and the head); the
server averages them. Exact, because ``A`` is shared: ``(sum w B_k) A = sum w B_k A``. Under DP
only ``B`` is noised, so no noise x noise cross term, and half the LoRA dimensions carry noise.
"""

from __future__ import annotations

from typing import ClassVar

from privfed.strategies.base import AdapterStrategy, Supports
from privfed.strategies.lora import fedavg, lora_pairs, relative_aggregation_error
from privfed.tensors import State


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def aggregate_frozen_a(global_state: State, payloads: list[State], weights: list[float]) -> State:
    """FedAvg of what the clients sent (B, head); every other tensor (A) stays as it was."""
    return {**global_state, **fedavg(payloads, weights)}


class FFALoRA(AdapterStrategy):
    name = "ffa_lora"
    supports: ClassVar[Supports] = Supports(prototype_head=True, noise_policy_base=True)

    def trainable(self, name: str) -> bool:
        return not is_lora_a(name)

    def fixed(self, name: str) -> bool:
        return is_lora_a(name)  # sent to each node once

    def aggregate(self, global_state: State, payloads: list[State], weights: list[float]) -> State:
        return aggregate_frozen_a(global_state, payloads, weights)

    def round_metrics(
        self, global_state: State, payloads: list[State], weights: list[float]
    ) -> dict[str, float]:
        """The same ``aggregation_error`` as ``lora`` with the shared A: ~0 unless A drifted."""
        factors = [
            ([global_state[a]] * len(payloads), [p[b] for p in payloads])
            for a, b in lora_pairs(list(global_state))
        ]
        return {"aggregation_error": relative_aggregation_error(factors, weights)}
