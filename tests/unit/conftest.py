from __future__ import annotations

import pytest


@pytest.fixture
def restore_task_identity(monkeypatch):
    """bench/simulation.py's flower_federation sets this process's task identity (messages take
    their run and sender from it), as run_simulation does; it is put back after each test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))
