"""Resident memory of this process and everything it started (Ray's raylet, GCS, actors)."""

from __future__ import annotations

import psutil


def process_tree_rss_mb() -> float:
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20
