"""The results store: one append-only results.jsonl, one RunResult per finished (or failed, or
interrupted) job; a resumed run appends a new line for the same run_dir and the last line wins."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from tre_cli.config import RunConfig
from tre_cli.io import append_line, read_jsonl
from tre_cli.tracking.run_dir import PathLike

RESULTS_STORE_FILE = "results.jsonl"
STATUSES = ("finished", "failed", "interrupted")


@dataclass(frozen=True)
class RunResult:
    """One finished (or failed, or interrupted) job: a line of the results store."""

    run_dir: str  # relative to the results store when inside it, else absolute
    method: str
    task: str
    model: str
    seed: int
    params: dict[str, Any]
    steps_done: int
    final_eval: float | None
    best_eval: float | None
    eval_metric: str | None
    wall_s: float
    status: str
    finished_at: str
    tre_version: str
    # The whole resolved config, so a report can group by anything (max_new_tokens for Figure 1).
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def results_store_dir(config: RunConfig, run_dir: PathLike) -> Path:
    return Path(config.run.results_store) if config.run.results_store else Path(run_dir).parent


def path_from_store(run_dir: Path, store_dir: Path) -> str:
    # Relative when inside the store, so a copied or moved runs/ folder still reads back.
    run_abs, store_abs = run_dir.resolve(), store_dir.resolve()
    if run_abs.is_relative_to(store_abs):
        return str(run_abs.relative_to(store_abs))
    return str(run_abs)


def append_result(store_dir: PathLike, result: RunResult | Mapping[str, Any]) -> Path:
    path = Path(store_dir) / RESULTS_STORE_FILE
    append_line(path, result.to_dict() if isinstance(result, RunResult) else dict(result))
    return path


def read_results(store_dir: PathLike, latest_per_run: bool = True) -> list[dict[str, Any]]:
    """The results store's records; by default only the last one per run directory."""
    records = read_jsonl(Path(store_dir) / RESULTS_STORE_FILE)
    if not latest_per_run:
        return records
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest.pop(record["run_dir"], None)  # re-insert so the order is that of the last line
        latest[record["run_dir"]] = record
    return list(latest.values())
