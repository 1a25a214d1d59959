"""Accuracy and epsilon per round, one picture per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_run(
    rows: list[dict[str, Any]], path: Path, title: str, epsilon_target: float | None
) -> None:
    """``title`` names the run (strategy, data, target, delta, sigma, final accuracy)."""
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
    tested = [r for r in rows if r["accuracy"] is not None]
    if tested:
        ax_acc.plot(
            [r["round"] for r in tested], [r["accuracy"] for r in tested], marker="o", label="test"
        )
    validated = [r for r in rows if r.get("val_accuracy") is not None]
    if validated:
        ax_acc.plot(
            [r["round"] for r in validated],
            [r["val_accuracy"] for r in validated],
            marker="s",
            linestyle="--",
            label="validation",
        )
        ax_acc.legend(loc="lower right")
    ax_acc.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="Accuracy")
    ax_acc.grid(alpha=0.3)
    # The mean is drawn on top, dashed with hollow markers: it often equals the max (every
    # client spends the same), and a line underneath would vanish.
    # user-level DP withholds the per-device figures (null): only the target is drawn
    spent = [r for r in rows if r["epsilon_max"] is not None]
    ax_eps.plot(
        [r["round"] for r in spent],
        [r["epsilon_max"] for r in spent],
        marker="o",
        lw=2.5,
        label="max over clients",
    )
    ax_eps.plot(
        [r["round"] for r in spent],
        [r["epsilon_mean"] for r in spent],
        marker="s",
        markerfacecolor="none",
        linestyle="--",
        color="black",
        label="mean over clients",
    )
    if epsilon_target is not None:
        ax_eps.axhline(epsilon_target, color="red", linestyle=":", label="target")
    top = max([epsilon_target or 0.0] + [r["epsilon_max"] for r in spent])
    ax_eps.set(
        xlabel="round", ylabel="epsilon spent", title="Privacy", ylim=(0, max(top, 1e-3) * 1.08)
    )
    ax_eps.grid(alpha=0.3)
    ax_eps.legend(loc="lower right")
    for ax in (ax_acc, ax_eps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
