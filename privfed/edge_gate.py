"""The device's gate: a SuperNode started by ``privfed-edge`` runs only bundles its owner approved.

A Flower SuperNode runs each task in a process it starts by command name (``flwr-clientapp``
for a ClientApp, through ``flower-superexec``). ``privfed-edge`` puts a directory of its own
first on the SuperNode's ``PATH`` (:func:`install_shims`) in which:

* ``flwr-clientapp`` is this gate: it lets Flower pull the task (the server's message and the
  bundle, nothing of the device's data), then, before the bundle is installed or any of its
  code imported, computes the bundle's digest (privfed/app_bundle.py) from its bytes and
  refuses it unless the device's approvals list it. A refusal is one log line, and the server
  gets an error reply: nothing is read, trained, charged or sent. An approved bundle is
  installed into a fresh Flower home of this process alone (so what is loaded is what was
  checked) and runs as Flower runs it.
* every other task command (``flwr-serverapp``, ``flwr-agentapp``, ...) refuses outright: a
  device runs ClientApps only.

The gate fails closed: if Flower's ClientApp runner no longer pulls its task the way this
gate checks it, or runtime dependency installation (the server's choice of packages) is
asked for, it refuses to run at all.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from privfed.app_bundle import APPROVALS_ENV, Approvals, BundleError, app_digest

CLIENTAPP = "flwr-clientapp"
REFUSE = "refuse"  # the gate's mode for every other task command
_ALLOW_DEPENDENCIES = "--allow-runtime-dependency-installation"


class AppNotApproved(RuntimeError):
    """The server's bundle is not one this device approved."""


def task_commands() -> list[str]:
    """Every command a SuperNode's executor may start for a task, as Flower names them."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    commands = sorted(set(TASK_TYPE_TO_COMMAND.values()))
    if TASK_TYPE_TO_COMMAND.get(TaskType.CLIENT_APP) != CLIENTAPP:
        raise RuntimeError(
            f"this Flower starts ClientApps as {TASK_TYPE_TO_COMMAND.get(TaskType.CLIENT_APP)!r}"
            f", not {CLIENTAPP!r}: privfed-edge cannot gate it"
        )
    return commands


def install_shims(bin_dir: Path, python: str = sys.executable) -> Path:
    """Write the gate's commands into ``bin_dir`` (put it first on the SuperNode's PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in task_commands():
        mode = "clientapp" if command == CLIENTAPP else REFUSE
        script = bin_dir / command
        # -I: the gate imports the device's own privfed, never one from the working directory
        script.write_text(
            f'#!/bin/sh\nexec "{python}" -I -m privfed.edge_gate {mode} {command} "$@"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def _log() -> logging.Logger:
    return logging.getLogger("flwr")


def checked_bundle(fab: bytes, approvals: Approvals) -> str:
    """The bundle's digest if approved; raises :class:`AppNotApproved` otherwise."""
    try:
        digest = app_digest(fab)
    except BundleError as err:
        raise AppNotApproved(f"refused the server's app: {err}") from None
    if not approvals.approves(digest):
        raise AppNotApproved(
            f"refused the server's app {digest}: not approved on this device "
            f"({approvals.path}); nothing read, trained or sent"
        )
    return digest


class _OneLine(logging.Filter):
    """Flower logs a task's exception with its traceback; a refusal is one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AppNotApproved):
            record.msg, record.args = str(record.exc_info[1]), ()
            record.exc_info = record.exc_text = None
        return True


def _guard_clientapp(approvals: Approvals) -> None:
    """Check the bundle in Flower's ClientApp runner between pulling the task and installing
    the bundle; fail closed if that runner is not the one this gate knows."""
    from flwr.supernode.runtime import run_clientapp as runner

    names = runner.run_clientapp.__code__.co_names
    if "pull_task_input" not in names or "install_from_fab" not in names:
        raise SystemExit(
            "privfed-edge: this Flower's ClientApp runner is not the one the gate checks "
            "(pull_task_input, install_from_fab); refusing to run any app"
        )
    install = runner.install_from_fab

    def install_approved(
        fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
    ) -> Path:
        fab = fab_file
        if isinstance(fab, Path):  # the runner passes bytes; a path would be read unchecked
            raise AppNotApproved("refused the server's app: given as a path, not its bytes")
        digest = checked_bundle(fab, approvals)
        _log().info("privfed-edge: running approved app %s", digest)
        # What is installed and loaded from here on is the checked bundle: its own code, not
        # privfed modules this gate imported from the device's installation.
        for name in [m for m in sys.modules if m == "privfed" or m.startswith("privfed.")]:
            del sys.modules[name]
        return install(fab, install_dir=install_dir, skip_prompt=skip_prompt)

    runner.install_from_fab = install_approved


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    mode, command, args = argv[0], argv[1], argv[2:]
    if mode != "clientapp":
        print(f"privfed-edge: refused a {command} task: this device runs ClientApps only")
        raise SystemExit(1)
    if _ALLOW_DEPENDENCIES in args:
        print("privfed-edge: refused: runtime dependency installation would install packages")
        print("the server chose; this device runs its own environment")
        raise SystemExit(1)
    approvals = Approvals(Path(os.environ.get(APPROVALS_ENV) or "approved-apps.txt"))
    if not approvals.digests():
        print(f"privfed-edge: refused: no app is approved in {approvals.path}")
        raise SystemExit(1)
    _guard_clientapp(approvals)
    # A Flower home for this task alone: the approved bundle is the only app installed in it.
    home = tempfile.mkdtemp(prefix="privfed-app-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["FLWR_HOME"] = home
    _log().addFilter(_OneLine())
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = [command, *args]
    flwr_clientapp()


if __name__ == "__main__":
    main()
