"""Tasks by name: data loading, prompt rendering and rewards for MATH, Countdown and HH.

    task = get_task("countdown", format_score=0.1)
    examples = task.load("train", limit=8)
    prompt = task.render(examples[0], tokenizer)
    rewards = task.rewards(responses, examples)

Each task's defaults for a run (data source, sizes, response length, evaluation) live in the
repository's tasks/<name>.yaml, an overlay of the run config; `task_overlay(name)` reads it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tre_cli.resources import data_dir
from tre_cli.tasks.base import Task

# name -> (module, class); modules are imported on demand so `import tre_cli.tasks` stays light.
_REGISTRY = {
    "math": ("tre_cli.tasks.math", "MathTask"),
    "countdown": ("tre_cli.tasks.countdown", "CountdownTask"),
    "hh": ("tre_cli.tasks.hh", "HHTask"),
}
TASKS = tuple(_REGISTRY)



def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


def get_task(name: str, **options) -> Task:
    """The task `name` built with `options` (the `task:` block of a run config)."""
    _check_name(name)
    module_name, class_name = _REGISTRY[name]
    task_class = getattr(importlib.import_module(module_name), class_name)
    return task_class(**options)


def task_for_run(name: str, options: dict, policy_model: str) -> Task:
    """The task a run of `policy_model` uses: built from its options and bound to the model (HH
    picks that model's reward model). Bad options, or HH without a reward model for the model,
    are a ValueError in one line, before anything is loaded."""
    return get_task(name, **options).bind_model(policy_model)


def overlay_path(name: str) -> Path:
    _check_name(name)
    path = data_dir("tasks") / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"task overlay {path} is missing; reinstall tre-cli")
    return path


def task_overlay(name: str) -> dict:
    """The run-config overlay for task `name` (tasks/<name>.yaml) as a dict."""
    import yaml

    path = overlay_path(name)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the overlay must be a mapping")
    return data


__all__ = ["TASKS", "Task", "get_task", "task_for_run", "task_overlay", "overlay_path"]
