"""Console progress: a round counter with ETA, and a short table of the results at the end."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.table import Table

from privfed.telemetry.console import CONSOLE, command_seconds


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


PULL_SHARE = 0.1  # of the server's time, at most, spent asking an in-process grid for replies
MIN_PULL_S = 0.01
REMOTE_PULL_S = 0.5  # a SuperLink over the network: asked at this pace, as before
STORED_WAIT_S = 1.0  # with a "reply stored" event: the longest wait for one before asking
_reply_stored: threading.Event | None = None  # announced by an in-process engine


def announce_stored_replies() -> threading.Event:
    """For an in-process engine that stores the clients' replies (simulation_delivery): the
    event to set after each reply it stores. From then on :func:`stored_replies` gives it to
    the server's loop, which asks the grid when there is a reply rather than on a timer."""
    global _reply_stored
    if _reply_stored is None:
        _reply_stored = threading.Event()
    return _reply_stored


def stored_replies() -> threading.Event | None:
    """The event an in-process engine sets after each reply it stores (cleared before each
    ask), or None where no engine in this process announced one (the server asks on a timer)."""
    return _reply_stored


def next_pull_in(cost_s: float, ceiling_s: float) -> float:
    """Seconds to wait before asking an in-process grid again, given what the last ask cost:
    soon while asking is cheap (the wait is a round's latency, paid once per round, and at 10
    clients per round Flower's 0.1 s was a third of the orchestration), never more than
    ``PULL_SHARE`` of the time, never later than the grid's own interval."""
    return min(ceiling_s, max(MIN_PULL_S, cost_s / PULL_SHARE))


def send_and_receive(
    grid, messages: list, timeout: float, on_reply, on_message=None, stored=None
) -> list:
    """``grid.send_and_receive`` with ``on_reply(done, sent)`` called as replies come in (the
    same push, pull and timeout as Flower's, which reports nothing until the last reply), and
    ``on_message(reply)`` on each new reply (the round's intake reads it meanwhile).

    ``stored``: an event set whenever a reply lands in an in-process grid's state
    (:func:`stored_replies`): then the grid is asked again only once one has, at
    most every ``STORED_WAIT_S`` otherwise (an expired message's error reply is made when
    asked, not stored)."""
    waiting = set(grid.push_messages(messages))
    sent, replies = len(waiting), []
    on_reply(0, sent)
    deadline = time.time() + timeout
    ceiling = getattr(grid, "pull_interval", None)  # only Flower's in-process grid has one
    while waiting and time.time() < deadline:
        if stored is not None:
            stored.clear()  # before asking: a reply stored from here on wakes the wait below
        asked = time.perf_counter()
        new = list(grid.pull_messages(waiting))
        cost = time.perf_counter() - asked
        if new:
            replies.extend(new)
            if on_message is not None:
                for reply in new:
                    on_message(reply)
            waiting.difference_update(m.metadata.reply_to_message_id for m in new)
            on_reply(len(replies), sent)
        if waiting:
            time.sleep(REMOTE_PULL_S if ceiling is None else next_pull_in(cost, ceiling))
            if stored is not None and ceiling is not None:
                stored.wait(max(0.0, min(STORED_WAIT_S, deadline - time.time())))
    return replies


class Progress:
    def __init__(
        self,
        num_rounds: int,
        start_round: int,
        enabled: bool = True,
        console=None,
        count_clients: bool = True,
    ) -> None:
        self.num_rounds = num_rounds
        self.start_round = start_round
        self.enabled = enabled
        self.count_clients = count_clients  # False under user-level DP: who took part is secret
        self.started = time.perf_counter()
        self.console = console or CONSOLE
        self._status: Any = None

    def clients_done(self, rnd: int, done: int, sent: int) -> None:
        """A live count during a round, on a terminal only (in a log it would be noise: the
        round's line says how many trained)."""
        if not (self.enabled and self.console.is_terminal):
            return
        text = f"round {rnd}/{self.num_rounds}: {done}/{sent} clients done"
        if not self.count_clients:
            text = f"round {rnd}/{self.num_rounds}: devices training"
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def _end_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def round_done(self, row: dict[str, Any]) -> None:
        self._end_status()
        if not self.enabled:
            return
        done = max(1, row["round"] - self.start_round + 1)
        per_round = (time.perf_counter() - self.started) / done
        eta = per_round * (self.num_rounds - row["round"])
        eps = row["epsilon_max"]
        target = row["epsilon_target"]
        if target is None:
            eps_txt = "non-private"
        elif eps is None:  # user-level DP: each device keeps its own
            eps_txt = f"record eps <= {target:g} per device"
        else:
            eps_txt = f"eps {eps:.2f}/{target:g}"
        if row.get("epsilon_user") is not None:
            eps_txt = (
                "" if target is None else eps_txt + ", "
            ) + f"user eps {row['epsilon_user']:.2f}/{row['epsilon_user_target']:g}"
        if row["clients_trained"] is None:
            clients = "clients withheld (user-level DP)"
        else:
            clients = (
                f"clients {row['clients_trained']} trained, {row['clients_sat_out']} sat out, "
                f"{row['clients_rejected']} rejected, {row['clients_failed']} failed"
            )
        if row["accuracy"] is not None:
            acc = f"acc {row['accuracy']:.3f}  loss {row['loss']:.3f}"
        else:  # eval.test=false: the validation split only
            acc = f"val acc {row['val_accuracy']:.3f}  val loss {row['val_loss']:.3f}"
        name = "prototypes" if row["round"] == 0 else f"round {row['round']}/{self.num_rounds}"
        self.console.print(
            f"[bold]{name}[/bold]  {acc}  {eps_txt}  {clients}  {per_round:.1f}s/round  "
            f"ETA {_duration(eta)}"
        )

    def final_table(self, summary: dict[str, Any]) -> None:
        self._end_status()
        if not self.enabled:
            return
        table = Table(title="privfed run")
        for col in (
            "strategy",
            "rounds",
            "accuracy",
            "epsilon spent",
            "target (eps, delta)",
            "sigma",
            "rejected",
            "rounds wall",
            "command wall",
        ):
            table.add_column(col)
        target = (
            f"({summary['epsilon_target']:g}, {summary['delta']:g})"
            if summary["epsilon_target"] is not None
            else "non-private"
        )
        sigma = summary["noise_multiplier"]
        if summary["epsilon_spent"] is None:  # user-level DP: the public bound per device
            bound = summary.get("epsilon_record_bound")
            spent = f"<= {bound:.3f} per device" if bound is not None else "-"
        else:
            spent = f"{summary['epsilon_spent']:.3f}" + (
                f" ({summary['epsilon_spent_by']})" if summary.get("epsilon_spent_by") else ""
            )
        sigma_txt = f"{sigma:.4f}" if sigma is not None else "-"
        if summary.get("epsilon_user") is not None:  # user-level DP: its own line of figures
            user = f"user {summary['epsilon_user']:.3f}"
            spent = user if summary["epsilon_target"] is None else f"{spent}; {user}"
            user_target = f"user ({summary['epsilon_user_target']:g}, {summary['user_delta']:g})"
            target = (
                user_target if summary["epsilon_target"] is None else f"{target}; {user_target}"
            )
            user_sigma = f"user {summary['user_noise_multiplier']:.4f}"
            sigma_txt = user_sigma if sigma is None else f"{sigma_txt}; {user_sigma}"
        table.add_row(
            summary["strategy"],
            f"{summary['rounds_completed']}/{summary['num_rounds']}",
            f"{summary['final_accuracy']:.4f}"
            if summary["final_accuracy"] is not None
            else (
                f"val {summary['final_val_accuracy']:.4f}"
                if summary.get("final_val_accuracy") is not None
                else "-"
            ),
            spent,
            target,
            sigma_txt,
            str(
                summary["clients_rejected_total"]
                if summary["clients_rejected_total"] is not None
                else "-"
            ),
            _duration(summary["wall_time_s"]),
            _duration(command_seconds()),  # start-up (data, model, Ray) included
        )
        self.console.print(table)
