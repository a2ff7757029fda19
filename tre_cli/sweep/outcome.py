"""What a sweep's trials come to: whether a trial's run directory holds a finished run
(result.json), the sweep's tally (SweepOutcome), and the fail-once test hook that makes every
trial fail once after a given step (read by the driver, acted on in the trial)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Test hook: TRE_SWEEP_FAIL_ONCE_AT_STEP=N (read by the driver, passed to every trial) makes each
# trial raise once right after step N, so retries from a checkpoint are tested without monkeypatching.
FAIL_ONCE_ENV = "TRE_SWEEP_FAIL_ONCE_AT_STEP"
# Left in a trial's run directory when the test hook above failed it (so it fails only once).
FAIL_ONCE_MARKER = ".sweep-failed-once"


@dataclass
class SweepOutcome:
    out: Path
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    interrupted: bool = False
    wall_s: float = 0.0


def fail_once_from_env() -> int | None:
    text = os.environ.get(FAIL_ONCE_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{FAIL_ONCE_ENV} must be a step number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{FAIL_ONCE_ENV} must be >= 1, got {value}")
    return value


def finished_result(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's result.json when it says the run finished, else None."""
    result_file = run_dir / "result.json"
    if not result_file.is_file():
        return None
    result = json.loads(result_file.read_text(encoding="utf-8"))
    return result if result.get("status") == "finished" else None
