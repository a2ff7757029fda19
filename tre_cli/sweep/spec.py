"""The sweep file (sweeps/<name>.yaml): its schema, its presets, and the SweepSpec it becomes.
Every error is one line naming the file, the preset and the key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from tre_cli.config import PRESETS, read_yaml_file
from tre_cli.losses.registry import BASE, METHODS

# Every key a sweep file (and each of its presets) may have.
SWEEP_KEYS = (
    "description", "tasks", "run_preset", "models", "variants", "max_new_tokens", "seeds", "set",
    "resources", "max_concurrent", "max_failures", "notes", "base", "task_set", "model_set",
)
# The variant name of Base evaluations (`tre eval` of the untrained model: Table 1's Base row).
BASE_VARIANT = BASE
# A variant's keys besides `method` are that method's parameters, plus `set` for other keys.
VARIANT_RESERVED = ("method", "set")

PathLike = str | Path


def sweeps_dir() -> Path:
    """The sweeps/ folder: the checkout's, or the copy an installed wheel carries."""
    from tre_cli.resources import data_dir

    return data_dir("sweeps")


def available_sweeps() -> list[str]:
    folder = sweeps_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


@dataclass(frozen=True)
class Variant:
    """One method setting of the grid: its name is part of the trial names."""

    name: str
    method: str
    params: dict[str, Any]
    set: dict[str, Any]


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class SweepSpec:
    """A sweep file with one preset applied."""

    name: str
    preset: str
    path: Path
    description: str
    tasks: tuple[str, ...]
    run_preset: str | None
    models: tuple[str, ...]
    variants: tuple[Variant, ...]
    # task -> the T values to sweep; a task not listed (or None) runs at its own T.
    max_new_tokens: dict[str, tuple[int, ...]] | None
    seeds: tuple[int, ...]
    set: dict[str, Any]
    resources: Resources
    max_concurrent: int | None
    max_failures: int
    notes: tuple[str, ...]
    # Also evaluate the untrained model once per task x model x T x seed (trainer.evaluate_model).
    base: bool = False
    # task -> run-config keys for that task's trials only (above `set`), e.g. HH's reward models.
    task_set: dict[str, dict[str, Any]] = field(default_factory=dict)
    # model -> run-config keys for that model's trials only (above `task_set`), e.g. run.workers.
    model_set: dict[str, dict[str, Any]] = field(default_factory=dict)


def safe_name(text: str) -> bool:
    """Whether `text` may name a variant (and so a trial and its run directory)."""
    return bool(text) and all(c.isalnum() or c in "._-" for c in text)


def sweep_path(name: PathLike) -> Path:
    """sweeps/<name>.yaml, or `name` itself when it is a YAML file's path."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"sweep file not found: {path}")
        return path
    path = sweeps_dir() / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(available_sweeps()) or "none"
        raise ValueError(f"unknown sweep {text!r}; choose one of: {known} (or pass a sweep YAML file)")
    return path


def _check_keys(layer: Mapping[str, Any], where: str) -> None:
    for key in layer:
        if key not in SWEEP_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; sweep keys are: {', '.join(SWEEP_KEYS)}")


def _as_list(value: Any, key: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: '{key}' must be a non-empty list, got {value!r}")
    return value


def _int_list(value: Any, key: str, where: str, minimum: int) -> tuple[int, ...]:
    items = _as_list(value, key, where)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise ValueError(f"{where}: '{key}' must hold integers >= {minimum}, got {item!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: '{key}' lists a value twice: {items!r}")
    return tuple(items)


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{where}: '{key}' must be a mapping, got {value!r}")
    return dict(value)


def _parse_variants(value: Any, where: str) -> tuple[Variant, ...]:
    raw = _mapping(value, "variants", where)
    if not raw:
        raise ValueError(f"{where}: 'variants' must name at least one method variant")
    variants = []
    for name, body in raw.items():
        if name == BASE_VARIANT:
            raise ValueError(
                f"{where}: the variant name {BASE_VARIANT!r} is reserved for Base evaluations (base: true)"
            )
        if not safe_name(name):
            raise ValueError(f"{where}: variant name {name!r} may only use letters, digits, '.', '_' and '-'")
        body = _mapping(body, f"variants.{name}", where)
        method = body.get("method")
        if method not in METHODS:
            raise ValueError(
                f"{where}: variant {name!r} names an unknown method {method!r}; choose one of: {', '.join(METHODS)}"
            )
        params = {k: v for k, v in body.items() if k not in VARIANT_RESERVED}
        for param in params:
            if param not in METHODS[method].defaults:
                own = ", ".join(METHODS[method].defaults) or "none"
                raise ValueError(
                    f"{where}: variant {name!r}: {param!r} is not a parameter of method {method!r} "
                    f"(its parameters: {own})"
                )
        variants.append(Variant(name, method, params, _mapping(body.get("set"), f"variants.{name}.set", where)))
    return tuple(variants)


def _parse_max_new_tokens(value: Any, where: str) -> dict[str, tuple[int, ...]] | None:
    if value is None:
        return None
    raw = _mapping(value, "max_new_tokens", where)
    return {task: _int_list(values, f"max_new_tokens.{task}", where, 1) for task, values in raw.items()}


def _parse_resources(value: Any, where: str) -> Resources:
    raw = _mapping(value, "resources", where)
    unknown = set(raw) - {"cpu", "gpu"}
    if unknown:
        raise ValueError(f"{where}: 'resources' takes cpu and gpu, got {sorted(unknown)}")
    values = {}
    for key in ("cpu", "gpu"):
        number = raw.get(key, getattr(Resources, key))
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise ValueError(f"{where}: 'resources.{key}' must be a number >= 0, got {number!r}")
        values[key] = float(number)
    if values["cpu"] <= 0:
        raise ValueError(f"{where}: 'resources.cpu' must be > 0, got {values['cpu']!r}")
    return Resources(**values)


def _optional_positive_int(value: Any, key: str, where: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: '{key}' must be an integer >= {minimum} (or null), got {value!r}")
    return value


def load_sweep(name: PathLike, preset: str | None = None) -> SweepSpec:
    """The sweep file `name` (sweeps/<name>.yaml or a path) with `preset` (default: paper) applied."""
    path = sweep_path(name)
    content = read_yaml_file(path, "sweep file")
    where = str(path)
    if not isinstance(content, Mapping):
        raise ValueError(f"{where}: a sweep file must contain a mapping, got {type(content).__name__}")
    content = dict(content)
    presets = _mapping(content.pop("presets", None), "presets", where)
    _check_keys(content, where)
    preset = preset or "paper"
    if preset not in presets:
        raise ValueError(f"{where}: unknown preset {preset!r}; this sweep has: {', '.join(presets) or 'none'}")
    layer = _mapping(presets[preset], f"presets.{preset}", where)
    _check_keys(layer, f"{where} (preset {preset})")
    merged = {**content, **layer}  # a preset's keys replace the file's own
    where = f"{where} (preset {preset})"

    from tre_cli.tasks import TASKS

    tasks = tuple(_as_list(merged.get("tasks"), "tasks", where))
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"{where}: unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    run_preset = merged.get("run_preset")
    if run_preset is not None and run_preset not in PRESETS:
        raise ValueError(f"{where}: 'run_preset' must be one of {', '.join(PRESETS)} (or null), got {run_preset!r}")
    models = tuple(str(m) for m in _as_list(merged.get("models"), "models", where))
    max_new_tokens = _parse_max_new_tokens(merged.get("max_new_tokens"), where)
    if max_new_tokens:
        for task in max_new_tokens:
            if task not in tasks:
                raise ValueError(
                    f"{where}: 'max_new_tokens' names task {task!r}, which is not in 'tasks' ({', '.join(tasks)})"
                )
    notes = merged.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"{where}: 'notes' must be a list of strings")
    base = merged.get("base", False)
    if not isinstance(base, bool):
        raise ValueError(f"{where}: 'base' must be true or false, got {base!r}")
    task_set = _mapping(merged.get("task_set"), "task_set", where)
    for task, values in task_set.items():
        if task not in TASKS:
            raise ValueError(f"{where}: 'task_set' names an unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        task_set[task] = _mapping(values, f"task_set.{task}", where)
    model_set = _mapping(merged.get("model_set"), "model_set", where)
    for model, values in model_set.items():
        if model not in models:
            raise ValueError(f"{where}: 'model_set' names {model!r}, which is not in 'models' ({', '.join(models)})")
        model_set[model] = _mapping(values, f"model_set.{model}", where)
    max_failures = merged.get("max_failures", 2)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ValueError(f"{where}: 'max_failures' must be an integer >= 0, got {max_failures!r}")
    return SweepSpec(
        name=path.stem,
        preset=preset,
        path=path,
        description=str(merged.get("description") or path.stem),
        tasks=tasks,
        run_preset=run_preset,
        models=models,
        variants=_parse_variants(merged.get("variants"), where),
        max_new_tokens=max_new_tokens,
        seeds=_int_list(merged.get("seeds", [0]), "seeds", where, 0),
        set=_mapping(merged.get("set"), "set", where),
        resources=_parse_resources(merged.get("resources"), where),
        max_concurrent=_optional_positive_int(merged.get("max_concurrent"), "max_concurrent", where, 1),
        max_failures=max_failures,
        notes=tuple(notes),
        base=base,
        task_set=task_set,
        model_set=model_set,
    )
