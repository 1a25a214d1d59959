"""Accuracy and epsilon per round, one picture per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(
    rows: list[dict[str, Any]], path: Path, title: str, epsilon_target: float | None
) -> None:
    rounds = [r["round"] for r in rows]
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_acc.plot(rounds, [r["accuracy"] for r in rows], marker="o")
    ax_acc.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Accuracy")
    ax_acc.grid(alpha=0.3)
    ax_eps.plot(rounds, [r["epsilon_max"] for r in rows], marker="o", label="max over clients")
    ax_eps.plot(rounds, [r["epsilon_mean"] for r in rows], marker=".", label="mean over clients")
    if epsilon_target is not None:
        ax_eps.axhline(epsilon_target, color="red", linestyle="--", label="target")
    ax_eps.set(xlabel="round", ylabel="epsilon spent", title="Privacy")
    ax_eps.grid(alpha=0.3)
    ax_eps.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
