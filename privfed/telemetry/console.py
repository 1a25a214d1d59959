"""What a user sees on the console: one line per start-up phase, the round counter, the final
table. Written to stderr (stdout stays for results a script may read).

A terminal gets rich's colours and its width. Anything else (a pipe, a log file, CI) gets plain
lines that are never wrapped or truncated: rich would otherwise assume 80 columns, wrap long
lines and cut table headers ("strate…"). ``NO_COLOR`` is respected (rich reads it).
"""

from __future__ import annotations

import logging
import sys
import time

import psutil
from rich.console import Console

WIDE = 240  # columns assumed when the output is not a terminal: no table needs more


def make_console() -> Console:
    if sys.stderr.isatty():
        return Console(stderr=True, highlight=False)
    return Console(stderr=True, highlight=False, width=WIDE, soft_wrap=True)


CONSOLE = make_console()
# Progress bars belong to the process the user started (the CLI turns this on); Ray actors and
# SuperNodes, which load the same data, stay quiet.
BARS = {"enabled": False}


def show_bars(enabled: bool = True) -> None:
    BARS["enabled"] = enabled


def bars_enabled() -> bool:
    """A bar only on a terminal (in a log it is noise) and only where the CLI asked for it."""
    return BARS["enabled"] and CONSOLE.is_terminal


def say(phase: str, text: str, enabled: bool = True) -> None:
    """``privfed: <phase>: <text>``, flushed at once (phases can take a while)."""
    if enabled:
        CONSOLE.print(f"privfed: {phase}: {text}", markup=False)
        CONSOLE.file.flush()


def command_seconds() -> float:
    """Wall time since this process started: what the user waited, start-up included."""
    return time.time() - psutil.Process().create_time()


class _DropActorTeardown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Manually terminating")


def quiet_actor_teardown() -> None:
    """Drop Flower's "Manually terminating ClientAppActor" warning in this process. Flower logs
    it in every Ray actor when a simulation ends normally; Ray forwards it to the console, where
    it landed after the run's final table and read like an error. Called where the actors load
    the ClientApp (client/app.py), so the filter sits in the process that logs it."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropActorTeardown) for f in logger.filters):
        logger.addFilter(_DropActorTeardown())
