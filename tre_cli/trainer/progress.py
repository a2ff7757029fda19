"""What a run shows while it trains: one line per step (stdout), and on the console (stderr) a
live bar of the steps with the phases of the current step (generation, old log-probs, update).

The per-step line is the record; everything else is for a person watching and goes to stderr:
a live display when stderr is a terminal (run.progress=auto), plain lines every few seconds
when it is not and progress is asked for (run.progress=on or --verbose), nothing otherwise.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from tre_cli import metrics as M
from tre_cli.evaluation import EvalResult

PROGRESS_MODES = ("auto", "on", "off")
# Plain progress lines (stderr not a terminal) at most this often per phase.
LINE_EVERY_S = 10.0


class Phases:
    """Progress within a step: `start` a phase with its total, `update` it with the amount done
    so far, `done` when it ends. This one shows nothing (run.progress=off, or no terminal)."""

    def start(self, phase: str, total: int, unit: str) -> None:
        pass

    def update(self, phase: str, completed: int, detail: str = "") -> None:
        pass

    def done(self, phase: str) -> None:
        pass

    def counter(self, phase: str):
        """`update` for one phase as a one-argument callable (what an engine's `progress` takes)."""
        return lambda completed: self.update(phase, completed)


NO_PHASES = Phases()


class LivePhases(Phases):
    """The phases as transient rows of a rich Progress (the step bar's)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def start(self, phase: str, total: int, unit: str) -> None:
        self.done(phase)
        self.tasks[phase] = self.progress.add_task(phase, total=max(1, total), unit=unit, detail="")

    def update(self, phase: str, completed: int, detail: str = "") -> None:
        if phase in self.tasks:
            self.progress.update(self.tasks[phase], completed=completed, detail=detail)

    def done(self, phase: str) -> None:
        task = self.tasks.pop(phase, None)
        if task is not None:
            self.progress.remove_task(task)


class LinePhases(Phases):
    """The phases as plain lines on a console that is not a terminal (a log file): one when a
    phase starts, one when it has made progress and LINE_EVERY_S has passed since its last
    line, one when it ends. (vLLM reports a sequence when its prompt's samples all finish, so a
    long generation may show only its start and end.)"""

    def __init__(self, console: Any, every_s: float = LINE_EVERY_S, clock=time.monotonic) -> None:
        self.console, self.every_s, self.clock = console, every_s, clock
        self.state: dict[str, dict[str, Any]] = {}

    def start(self, phase: str, total: int, unit: str) -> None:
        now = self.clock()
        self.state[phase] = {"total": total, "unit": unit, "started": now, "shown": now, "completed": 0, "detail": ""}
        self._line(phase, self.state[phase])

    def update(self, phase: str, completed: int, detail: str = "") -> None:
        state = self.state.get(phase)
        if state is None:
            return
        state["completed"], state["detail"] = completed, detail
        if self.clock() - state["shown"] >= self.every_s:
            self._line(phase, state)

    def done(self, phase: str) -> None:
        state = self.state.pop(phase, None)
        if state is not None:
            state["completed"], state["detail"] = state["total"], ""
            self._line(phase, state)

    def _line(self, phase: str, state: dict[str, Any]) -> None:
        state["shown"] = now = self.clock()
        detail = f", {state['detail']}" if state["detail"] else ""
        self.console.print(f"  {phase} {state['completed']}/{state['total']} {state['unit']}{detail} "
                           f"({now - state['started']:.0f}s)", markup=False, highlight=False, soft_wrap=True)


def show_progress(mode: str, console: Any, verbose: bool = False) -> str:
    """How to show progress on `console` (stderr): "live", "lines" or "none"."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    if mode == "off":
        return "none"
    if console.is_terminal:
        return "live"
    return "lines" if mode == "on" or verbose else "none"


class Bar:
    """A live progress bar under the per-step lines in a terminal, with the current step's
    phases (`phases`); nothing elsewhere (CI logs keep only the lines)."""

    def __init__(self, progress: Any = None, task: Any = None, phases: Phases = NO_PHASES) -> None:
        self.progress, self.task, self.phases = progress, task, phases

    def advance(self, metrics: dict[str, float]) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, reward=metrics[M.REWARD_MEAN])

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def progress_bar(console: Any, steps: int | None, done: int, how: str = "live") -> Bar:
    """The display on `console` (stderr): `how` from show_progress. `steps` None: no step bar,
    the phases only (tre eval)."""
    if how == "lines":
        return Bar(phases=LinePhases(console))
    if how != "live":
        return Bar()
    progress = _live_progress(console)
    task = None
    if steps is not None:
        task = progress.add_task("PPO", total=steps, completed=done, reward=float("nan"), unit="steps", detail="")
    progress.start()
    return Bar(progress, task, LivePhases(progress))


def _live_progress(console: Any):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class _Fields(ProgressColumn):
        """reward on the step bar; unit and detail on a phase's."""

        def render(self, task):
            if "reward" in task.fields:
                return Text(f"steps  reward {task.fields['reward']:.3f}")
            detail = f"  {task.fields['detail']}" if task.fields.get("detail") else ""
            return Text(f"{task.fields['unit']}{detail}")

    # Per-step lines written to stdout go above the display only when stdout is the same
    # terminal; redirected to a file they must stay there, untouched.
    return Progress(TextColumn("[bold]{task.description:>14}"), BarColumn(), MofNCompleteColumn(), _Fields(),
                    TimeElapsedColumn(), console=console, transient=True,
                    redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)


# Loggers of the libraries under tre that print at INFO/WARNING on every start (vLLM has its
# own: tre_cli.rollout.vllm.vllm_logs).
NOISY_LOGGERS = ("torch._library", "torch.distributed")


def quiet_transformers(verbose: bool = False) -> None:
    """Checkpoint saves and loads would each draw a progress bar; one line per step is ours.
    transformers' (and torch's noisiest) warnings only with `verbose`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if verbose:
        hf_logging.set_verbosity_warning()
    else:
        hf_logging.set_verbosity_error()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


def progress_line(step: int, steps: int, m: dict[str, float], evaluated: EvalResult | None) -> str:
    line = (f"step {step:>4}/{steps}  reward {m['reward/mean']:.3f}  p_max {m.get('actor/p_max', math.nan):.3f}  "
            f"entropy {m.get('actor/entropy', math.nan):.3f}  len {m['response/length_mean']:.0f}  "
            f"{m['timing/step_s']:.1f}s  {m['perf/tokens_per_s']:.0f} tok/s")
    if M.REGION_SIZE in m:
        line += f"  region {m['actor/tre_region_size']:.1f}"
    if evaluated is not None:
        line += f"  [bold]eval {evaluated.metric} {evaluated.score:.3f}[/]"
    return line
