"""LoRA-SB: ``W0 x + s * B R A x`` with fixed ``B`` (d_out x r), ``A`` (r x d_in) and a small
trainable ``R`` (r x r) (Ponkshe et al. 2024, the adapter of Fed-SB).

peft has no such parameterisation, so this is our own module. It is built from three bias-free
``nn.Linear`` layers (``sb_A``: d_in -> r, ``sb_R``: r -> r, ``sb_B``: r -> d_out) so that Opacus
computes per-sample gradients of ``R`` with its stock ``nn.Linear`` grad sampler, and the frozen
``A`` and ``B`` get no hooks at all (Opacus hooks only modules with trainable parameters).
"""

from __future__ import annotations

import torch
from torch import nn


class LoraSBLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the LoRA-SB branch ``scaling * B R A``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r > min(base.in_features, base.out_features):
            raise ValueError(
                f"LoRA-SB rank {r} (strategy.rank, or model.lora.r) exceeds min(d_in, d_out) = "
                f"{min(base.in_features, base.out_features)} of a LoRA-SB target"
            )
        self.base_layer = base
        self.sb_A = nn.Linear(base.in_features, r, bias=False)
        self.sb_R = nn.Linear(r, r, bias=False)
        self.sb_B = nn.Linear(r, base.out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        with torch.no_grad():
            self.sb_R.weight.zero_()  # no change to the base model until R trains

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B R A`` (d_out x d_in)."""
        return self.scaling * self.sb_B.weight @ self.sb_R.weight @ self.sb_A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * self.sb_B(self.sb_R(self.sb_A(self.dropout(x))))


def inject_lora_sb(
    model: nn.Module, target_modules: list[str], r: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with one of ``target_modules`` by a
    :class:`LoraSBLinear`; returns the replaced module names."""
    replaced = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in target_modules and isinstance(module, nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, LoraSBLinear(module, r, alpha, dropout))
            replaced.append(name)
    return replaced


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows x cols) matrix with orthonormal columns (rows >= cols) from a seeded Gaussian."""
    g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: a Haar-distributed Q


def svd_factors(
    delta_w: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB's initialisation from an estimated first update ``delta_w`` (d_out x d_in):
    ``B = U_r``, ``A = V_r^T``, ``R = Sigma_r / scaling``, so ``scaling B R A`` is the best
    rank-r approximation of ``delta_w``."""
    u, s, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    b, a, rr = u[:, :r], vh[:r, :], torch.diag(s[:r]) / scaling
    return b.float(), rr.float(), a.float()
