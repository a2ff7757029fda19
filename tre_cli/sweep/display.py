"""The driver's live view of a sweep: a table of trials and one line per trial event."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

from tre_cli import metrics as M


@dataclass
class TrialProgress:
    """What the display shows of one trial; updated from Ray's trial events in the driver."""

    name: str
    status: str = "pending"  # pending | running | done | failed | retrying
    step: int = 0
    steps: int | None = None
    reward: float | None = None
    score: float | None = None
    failures: int = 0
    error: str | None = None


STATUS_STYLES = {"pending": "dim", "running": "cyan", "retrying": "yellow", "done": "green", "failed": "bold red"}


def progress_counts(trials: Sequence[TrialProgress]) -> dict[str, int]:
    counts = {status: 0 for status in STATUS_STYLES}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    return counts


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def progress_table(title: str, trials: Sequence[TrialProgress], elapsed_s: float):
    """A rich Table of the trials with a caption counting done, running, failed."""
    from rich.table import Table

    counts = progress_counts(trials)
    caption = (f"{counts['done']}/{len(trials)} done, {counts['running'] + counts['retrying']} running, "
               f"{counts['pending']} pending, {counts['failed']} failed, {sum(t.failures for t in trials)} retries"
               f" - {elapsed_s:.0f}s")
    table = Table(title=title, caption=caption, expand=False)
    for column in ("trial", "status", "step", "reward", "eval", "retries"):
        table.add_column(column, justify="right" if column not in ("trial", "status") else "left")
    for trial in trials:
        step = f"{trial.step}/{trial.steps}" if trial.steps else (str(trial.step) if trial.step else "")
        table.add_row(trial.name, f"[{STATUS_STYLES.get(trial.status, '')}]{trial.status}[/]", step,
                      _fmt(trial.reward), _fmt(trial.score), str(trial.failures or ""))
    return table


class SweepDisplay:
    """The driver's live view: a table of trials plus one printed line per trial event."""

    def __init__(self, title: str, names: Sequence[str], console) -> None:
        self.title = title
        self.console = console
        self.trials = {name: TrialProgress(name) for name in names}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._live = None

    def __enter__(self) -> SweepDisplay:
        from rich.live import Live

        # A terminal gets the live table; a log (make demo | tee, CI) gets the event lines only.
        if self.console.is_terminal:
            self._live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False,
                              get_renderable=self.render)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        else:
            self.console.print(self.render())

    def render(self):
        with self._lock:
            rows = [dataclasses.replace(t) for t in self.trials.values()]
        return progress_table(self.title, rows, time.monotonic() - self.started)

    def update(self, name: str, event: str, result: Mapping[str, Any] | None = None, failures: int = 0,
               error: str | None = None) -> None:
        trial = self.trials.setdefault(name, TrialProgress(name))
        line = None
        with self._lock:
            if result:
                trial.step = int(result.get("step", trial.step) or trial.step)
                trial.steps = int(result["steps"]) if result.get("steps") else trial.steps
                trial.reward = result.get(M.REWARD_MEAN, trial.reward)
                trial.score = result.get(M.EVAL_SCORE, trial.score)
            trial.failures = max(trial.failures, failures)
            if event == "start":
                trial.status = "retrying" if trial.failures else "running"
                line = f"[cyan]start[/] {name}" + (f" (retry {trial.failures})" if trial.failures else "")
            elif event == "result":
                if trial.status == "pending":
                    trial.status = "running"
            elif event == "complete":
                trial.status = "done"
                line = f"[green]done[/]  {name}  reward {_fmt(trial.reward)}  eval {_fmt(trial.score)}"
            elif event == "error":
                trial.status = "failed"
                trial.error = error
                line = f"[bold red]failed[/] {name}: {error or 'see its error.txt'}"
            elif event == "retry":
                trial.status = "retrying"
                line = f"[yellow]retry[/] {name} from its last checkpoint ({trial.failures} failure(s)): {error or ''}"
        if line:
            self.console.print(line, highlight=False)

