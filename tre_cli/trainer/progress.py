"""What a run shows while it trains: one line per step, and a live bar in a terminal."""

from __future__ import annotations

import math
from typing import Any

from tre_cli.evaluation import EvalResult


class Bar:
    """A live progress bar under the per-step lines in a terminal; nothing elsewhere (CI logs
    keep only the lines)."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self.progress, self.task = progress, task

    def advance(self, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, reward=metrics["reward/mean"])

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def progress_bar(console: Any, steps: int, done: int) -> Bar:
    if not console.is_terminal:
        return Bar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("reward {task.fields[reward]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    task = progress.add_task("steps", total=steps, completed=done, reward=float("nan"))
    progress.start()
    return Bar(progress, task)


def quiet_transformers() -> None:
    """Checkpoint saves and loads would each draw a progress bar; one line per step is ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def progress_line(step: int, steps: int, m: dict[str, float], evaluated: EvalResult | None) -> str:
    line = (f"step {step:>4}/{steps}  reward {m['reward/mean']:.3f}  p_max {m.get('actor/p_max', math.nan):.3f}  "
            f"entropy {m.get('actor/entropy', math.nan):.3f}  len {m['response/length_mean']:.0f}  "
            f"{m['timing/step_s']:.1f}s  {m['perf/tokens_per_s']:.0f} tok/s")
    if "actor/tre_region_size" in m:
        line += f"  region {m['actor/tre_region_size']:.1f}"
    if evaluated is not None:
        line += f"  [bold]eval {evaluated.metric} {evaluated.score:.3f}[/]"
    return line
