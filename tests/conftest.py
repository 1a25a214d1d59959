"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def flower_task_identity():
    """Flower Messages built outside a Flower run (unit tests) need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old
