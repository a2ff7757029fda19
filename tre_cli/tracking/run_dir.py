"""A run directory: its files' names, claiming a fresh one (config.yaml first), opening one to
resume or read, its checkpoints' places, and reading it back in one shape (`read_run`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tre_cli.config import RunConfig, dump_yaml, read_yaml_file, with_overrides
from tre_cli.io import read_jsonl

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
RESULT_FILE = "result.json"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")

PathLike = str | Path


@dataclass(frozen=True)
class RunDir:
    """Where a run's files live; checkpoints are `checkpoints/step_<N>/`."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def eval_file(self) -> Path:
        return self.path / EVAL_FILE

    @property
    def result_file(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{int(step)}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for entry in self.checkpoints.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        checkpoints = self.list_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def prune_checkpoints(self, keep_last: int) -> list[Path]:
        """Delete all but the newest keep_last checkpoints; returns the deleted paths."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        doomed = [path for _, path in self.list_checkpoints()[:-keep_last]]
        for path in doomed:
            shutil.rmtree(path)
        return doomed


def model_label(model: str) -> str:
    """A model's short name: the last part of its hub id or path (tables, figures, trial names)."""
    return model.rstrip("/").rsplit("/", 1)[-1] or model


def default_run_dir(config: RunConfig, root: PathLike = "runs", now: _dt.datetime | None = None) -> Path:
    """runs/<task>-<method>-<YYYYmmdd-HHMMSS>, or run.out when the config names one."""
    if config.run.out is not None:
        return Path(config.run.out)
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.task.name}-{config.method.name}-{stamp}"


def create_run_dir(path: PathLike, config: RunConfig) -> RunDir:
    """Claim a fresh run directory and write its config.yaml first.

    An existing non-empty directory is refused; two processes claiming the same directory cannot
    both succeed (config.yaml is published with a hard link, which never replaces a file).
    """
    run_dir = RunDir(Path(path))
    if run_dir.path.exists() and not run_dir.path.is_dir():
        raise ValueError(f"run directory {run_dir.path} exists and is not a directory")
    if run_dir.path.is_dir() and any(run_dir.path.iterdir()):
        raise ValueError(
            f"run directory {run_dir.path} already exists and is not empty; pass another --out or resume it"
        )
    run_dir.path.mkdir(parents=True, exist_ok=True)
    config = with_overrides(config, {"run.out": str(run_dir.path)})
    tmp = dump_yaml(config, run_dir.path / f".{CONFIG_FILE}.{secrets.token_hex(4)}")
    try:
        os.link(tmp, run_dir.config_file)
    except FileExistsError:
        raise ValueError(f"run directory {run_dir.path} was claimed by another run") from None
    finally:
        tmp.unlink(missing_ok=True)
    return run_dir


def open_run_dir(path: PathLike) -> RunDir:
    """An existing run directory (to resume or read): it must hold a config.yaml."""
    run_dir = RunDir(Path(path))
    if not run_dir.config_file.is_file():
        raise FileNotFoundError(f"not a run directory (no {CONFIG_FILE}): {run_dir.path}")
    return run_dir


def read_run(run_dir: PathLike) -> dict[str, Any]:
    """A run directory's content: config (dict), metrics, eval, result (None while running), checkpoints."""
    run = open_run_dir(run_dir)
    result = json.loads(run.result_file.read_text(encoding="utf-8")) if run.result_file.exists() else None
    return {
        "path": str(run.path),
        "config": read_yaml_file(run.config_file, "run config") or {},
        "metrics": read_jsonl(run.metrics_file),
        "eval": read_jsonl(run.eval_file),
        "result": result,
        "checkpoints": [step for step, _ in run.list_checkpoints()],
    }
