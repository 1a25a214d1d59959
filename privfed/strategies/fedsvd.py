"""FedSVD (``strategy=fedsvd``): "FedSVD: Adaptive Orthogonalization for Private Federated
Learning with LoRA".

Clients train ``B`` under a shared ``A`` (as FFA-LoRA) and send ``B_k``. The server averages
``B_bar = sum w B_k`` and re-factors the product ``M = B_bar A`` (rank <= r) by a truncated SVD
computed from QR factors of ``B_bar`` and ``A^T`` and an r x r SVD (never a dense
d_out x d_in one): ``A <- V_r^T`` (orthonormal rows), ``B <- U_r Sigma_r``, so that
``B_new A_new = B_bar A_old`` exactly. The refreshed ``A`` follows the principal directions of
the aggregated update; re-factoring is post-processing of DP releases, so it costs no privacy.
"""

from __future__ import annotations

from typing import Any

import torch

from privfed.config import RunConfig
from privfed.strategies.ffa_lora import FFALoRA, aggregate_frozen_a
from privfed.strategies.lora import lora_pairs
from privfed.strategies.settings import Count, StrategySettings
from privfed.tensors import State


def refactor(b_bar: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_new, A_new) with ``B_new @ A_new == b_bar @ a`` and orthonormal rows of ``A_new``.

    ``b_bar``: (d_out, r), ``a``: (r, d_in). Costs two thin QRs and one r x r SVD.
    """
    dtype = b_bar.dtype
    b64, a64 = b_bar.double(), a.double()
    q_b, r_b = torch.linalg.qr(b64)  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a64.T)  # (d_in, r), (r, r)
    u_s, sigma, vh_s = torch.linalg.svd(r_b @ r_a.T)  # r x r
    b_new = (q_b @ u_s) * sigma  # U_r Sigma_r
    a_new = (q_a @ vh_s.T).T  # V_r^T
    return b_new.to(dtype), a_new.to(dtype)


class FedSVD(FFALoRA):
    name = "fedsvd"

    class Settings(StrategySettings):
        refactor_every: Count  # re-factor every k rounds

    settings: Settings

    def __init__(self, cfg: RunConfig, settings: StrategySettings | None = None) -> None:
        super().__init__(cfg, settings)
        self.rounds_aggregated = 0

    def aggregate(self, global_state: State, payloads: list[State], weights: list[float]) -> State:
        new = aggregate_frozen_a(global_state, payloads, weights)
        self.rounds_aggregated += 1
        if self.rounds_aggregated % self.settings.refactor_every:
            return new
        for a_name, b_name in lora_pairs(list(new)):
            new[b_name], new[a_name] = refactor(new[b_name], new[a_name])
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_aggregated": self.rounds_aggregated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_aggregated = int(state.get("rounds_aggregated", 0))
