"""`tre sweep`: a grid of `tre run` jobs from sweeps/<name>.yaml, run as Ray Tune trials.

This is the only module that imports ray (inside the functions that need it, so the grid, the
validation and `--dry-run` work without it). The flow:

    sweeps/<name>.yaml + preset + --task/--seeds/--set
      -> expand_grid(): one Trial (name, `--set` overrides) per task x model x T x variant x seed
      -> plan_sweep(): every trial's RunConfig resolved and its task options checked BEFORE Ray
         starts (bad input is one line, and nothing is written)
      -> run_sweep(): a Tuner whose function trainable calls trainer.run(config, on_step=...) in the
         trial's process (no subprocess, no argv, no log parsing). Each trial's tre run directory
         is <out>/runs/<trial>; the results store is <out>/runs/results.jsonl.

Checkpoints: the trainer checkpoints the run directory itself; the Ray checkpoint that goes with
it only records where that run directory is. A retried trial (FailureConfig.max_failures) or a
trial of a resumed sweep (`--resume`, Tuner.restore) continues its run directory with
`run.resume`, so its metrics are those of an uninterrupted run. A run directory whose result.json
says "finished" is never trained again.

Layout of <out>:

    sweep.json      what was asked (name, preset, tasks, seeds, sets) and the trial list; --resume
                    checks that it is asked the same again
    runs/<trial>/   tre run directories (config.yaml, metrics.jsonl, checkpoints/, wandb/...)
    runs/results.jsonl   one line per finished (or failed) attempt; the last line per run wins
    ray/tune/       Ray Tune's experiment state (storage_path; --storage puts it elsewhere)
    .ray/           Ray's session files (temp dir), its token, W&B's caches: never /tmp or ~

Test hook: TRE_SWEEP_FAIL_ONCE_AT_STEP=N (read by the driver, passed to every trial) makes each
trial raise once right after step N (a marker file in its run directory makes it once), so
retries from a checkpoint can be tested without monkeypatching.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tre_cli.config import PRESETS, RunConfig, from_dict, read_yaml_file, resolve, to_dict, with_overrides

FAIL_ONCE_ENV = "TRE_SWEEP_FAIL_ONCE_AT_STEP"
SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
EXPERIMENT_NAME = "tune"
_FAIL_MARKER = ".sweep-failed-once"

# Every key a sweep file (and each of its presets) may have.
SWEEP_KEYS = (
    "description", "tasks", "run_preset", "models", "variants", "max_new_tokens", "seeds", "set",
    "resources", "max_concurrent", "max_failures", "notes", "base", "task_set",
)
# The variant name of Base evaluations (`tre eval` of the untrained model: Table 1's Base row).
BASE_VARIANT = "base"
# A variant's keys besides `method` are that method's parameters, plus `set` for other keys.
VARIANT_RESERVED = ("method", "set")

PathLike = Union[str, Path]


def sweeps_dir() -> Path:
    """The sweeps/ folder: the checkout's, or the copy an installed wheel carries."""
    from tre_cli.resources import data_dir

    return data_dir("sweeps")


def available_sweeps() -> List[str]:
    folder = sweeps_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


# --------------------------------------------------------------------------- the sweep file


@dataclass(frozen=True)
class Variant:
    """One method setting of the grid: its name is part of the trial names."""

    name: str
    method: str
    params: Dict[str, Any]
    set: Dict[str, Any]


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
    tasks: Tuple[str, ...]
    run_preset: Optional[str]
    models: Tuple[str, ...]
    variants: Tuple[Variant, ...]
    # task -> the T values to sweep; a task not listed (or None) runs at its own T.
    max_new_tokens: Optional[Dict[str, Tuple[int, ...]]]
    seeds: Tuple[int, ...]
    set: Dict[str, Any]
    resources: Resources
    max_concurrent: Optional[int]
    max_failures: int
    notes: Tuple[str, ...]
    # Also evaluate the untrained model once per task x model x T x seed (trainer.evaluate_model).
    base: bool = False
    # task -> run-config keys for that task's trials only (above `set`), e.g. HH's reward models.
    task_set: Dict[str, Dict[str, Any]] = field(default_factory=dict)


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


def _int_list(value: Any, key: str, where: str, minimum: int) -> Tuple[int, ...]:
    items = _as_list(value, key, where)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
            raise ValueError(f"{where}: '{key}' must hold integers >= {minimum}, got {item!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: '{key}' lists a value twice: {items!r}")
    return tuple(items)


def _mapping(value: Any, key: str, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{where}: '{key}' must be a mapping, got {value!r}")
    return dict(value)


def _parse_variants(value: Any, where: str) -> Tuple[Variant, ...]:
    from tre_cli.losses.registry import METHODS

    raw = _mapping(value, "variants", where)
    if not raw:
        raise ValueError(f"{where}: 'variants' must name at least one method variant")
    variants = []
    for name, body in raw.items():
        if name == BASE_VARIANT:
            raise ValueError(f"{where}: the variant name {BASE_VARIANT!r} is reserved for Base evaluations (base: true)")
        if not _safe_name(name):
            raise ValueError(f"{where}: variant name {name!r} may only use letters, digits, '.', '_' and '-'")
        body = _mapping(body, f"variants.{name}", where)
        method = body.get("method")
        if method not in METHODS:
            raise ValueError(f"{where}: variant {name!r} names an unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        params = {k: v for k, v in body.items() if k not in VARIANT_RESERVED}
        for param in params:
            if param not in METHODS[method].defaults:
                own = ", ".join(METHODS[method].defaults) or "none"
                raise ValueError(f"{where}: variant {name!r}: {param!r} is not a parameter of method {method!r} (its parameters: {own})")
        variants.append(Variant(name, method, params, _mapping(body.get("set"), f"variants.{name}.set", where)))
    return tuple(variants)


def _parse_max_new_tokens(value: Any, where: str) -> Optional[Dict[str, Tuple[int, ...]]]:
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


def _optional_positive_int(value: Any, key: str, where: str, minimum: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: '{key}' must be an integer >= {minimum} (or null), got {value!r}")
    return value


def load_sweep(name: PathLike, preset: Optional[str] = None) -> SweepSpec:
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
                raise ValueError(f"{where}: 'max_new_tokens' names task {task!r}, which is not in 'tasks' ({', '.join(tasks)})")
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
    )


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Trial:
    """One job of the grid: `overrides` are `tre run --set` items, lowest precedence first."""

    name: str
    task: str
    model: str
    max_new_tokens: Optional[int]
    variant: str
    seed: int
    overrides: Tuple[str, ...]
    # "train": trainer.run; "eval": trainer.evaluate_model (a Base evaluation, no training).
    kind: str = "train"


def _safe_name(text: str) -> bool:
    return bool(text) and all(c.isalnum() or c in "._-" for c in text)


def model_label(model: str) -> str:
    """A model's short name for trial names: the last path part, made filesystem-safe."""
    tail = model.rstrip("/").split("/")[-1] or model
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tail)


def yaml_scalar(value: Any) -> str:
    """A value as `--set` text that reads back as the same value (floats stay floats)."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            # YAML 1.1 reads 1e-05 as a string; 1.0e-05 is a float.
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    # JSON is YAML: strings come out quoted ('1e-3' and 'off' stay text), lists and mappings whole.
    return json.dumps(value)


def _set_items(values: Mapping[str, Any]) -> List[str]:
    return [f"{key}={yaml_scalar(value)}" for key, value in values.items()]


def select_tasks(spec: SweepSpec, tasks: Sequence[str] = ()) -> Tuple[str, ...]:
    """The tasks to run: those asked for (each must be one of the sweep's), else all of them."""
    if not tasks:
        return spec.tasks
    for task in tasks:
        if task not in spec.tasks:
            raise ValueError(
                f"sweep {spec.name!r} (preset {spec.preset}) runs on {', '.join(spec.tasks)}; --task {task} is not one of them"
            )
    return tuple(dict.fromkeys(tasks))


def _grid_variants(spec: SweepSpec) -> Tuple[Variant, ...]:
    # Base is evaluated like Vanilla's starting point: the method only names the config's defaults.
    base = (Variant(BASE_VARIANT, "vanilla", {}, {}),) if spec.base else ()
    return base + spec.variants


def expand_grid(spec: SweepSpec, tasks: Sequence[str] = (), seeds: Optional[Sequence[int]] = None) -> List[Trial]:
    """Every trial of the sweep: tasks x models x T x variants x seeds, in that nesting order.

    Pure: no files, no Ray. The model appears in trial names only when the sweep has several.
    """
    chosen = select_tasks(spec, tasks)
    seed_list = tuple(spec.seeds if seeds is None else seeds)
    if not seed_list:
        raise ValueError("--seeds must name at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seed_list) or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds must be distinct integers >= 0, got {list(seed_list)}")
    trials = []
    for task in chosen:
        horizons: Tuple[Optional[int], ...] = (None,)
        if spec.max_new_tokens and task in spec.max_new_tokens:
            horizons = spec.max_new_tokens[task]
        for model in spec.models:
            for horizon in horizons:
                for variant in _grid_variants(spec):
                    for seed in seed_list:
                        parts = [task]
                        if len(spec.models) > 1:
                            parts.append(model_label(model))
                        if horizon is not None:
                            parts.append(f"T{horizon}")
                        parts += [variant.name, f"s{seed}"]
                        grid = {"task.name": task, "model.name": model, "method.name": variant.method}
                        grid.update({f"method.{k}": v for k, v in variant.params.items()})
                        if horizon is not None:
                            grid["rollout.max_new_tokens"] = horizon
                        grid["run.seed"] = seed
                        overrides = (_set_items(spec.set) + _set_items(spec.task_set.get(task, {})) + _set_items(variant.set)
                                     + _set_items(grid))
                        kind = "eval" if variant.name == BASE_VARIANT else "train"
                        trials.append(Trial("-".join(parts), task, model, horizon, variant.name, seed, tuple(overrides), kind))
    names = [t.name for t in trials]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep {spec.name!r} gives two trials the same name: {duplicates[0]} (rename a variant)")
    return trials


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class PlannedTrial:
    trial: Trial
    run_dir: Path
    config: RunConfig


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    out: Path
    tasks: Tuple[str, ...]
    seeds: Tuple[int, ...]
    sets: Tuple[str, ...]
    resources: Resources
    max_concurrent: Optional[int]
    max_failures: int
    trials: Tuple[PlannedTrial, ...]

    def manifest(self) -> Dict[str, Any]:
        """What sweep.json records; --resume must ask for the same."""
        return {
            "sweep": self.spec.name,
            "sweep_file": str(self.spec.path),
            "preset": self.spec.preset,
            "tasks": list(self.tasks),
            "seeds": list(self.seeds),
            "sets": list(self.sets),
            "resources": dataclasses.asdict(self.resources),
            "max_concurrent": self.max_concurrent,
            "max_failures": self.max_failures,
            "trials": [p.trial.name for p in self.trials],
        }


def default_out(spec: SweepSpec, tasks: Sequence[str]) -> Path:
    return Path("runs") / f"sweep-{spec.name}-{'-'.join(tasks)}-{spec.preset}"


def plan_sweep(
    name: PathLike,
    tasks: Sequence[str] = (),
    preset: Optional[str] = None,
    sets: Sequence[str] = (),
    out: Optional[PathLike] = None,
    seeds: Optional[Sequence[int]] = None,
    *,
    cpus_per_trial: Optional[float] = None,
    gpus_per_trial: Optional[float] = None,
    max_concurrent: Optional[int] = None,
    max_failures: Optional[int] = None,
    task_overlay: Any = None,
) -> SweepPlan:
    """The sweep's trials, each with its resolved RunConfig; raises before anything is written.

    `sets` (the CLI's --set) apply to every trial above the grid's values. `task_overlay` is
    config.resolve's (tests use small tasks).
    """
    spec = load_sweep(name, preset)
    trials = expand_grid(spec, tasks, seeds)
    chosen = select_tasks(spec, tasks)
    out_dir = Path(out) if out is not None else default_out(spec, chosen)
    out_dir = out_dir.absolute()
    resources = Resources(
        cpu=spec.resources.cpu if cpus_per_trial is None else float(cpus_per_trial),
        gpu=spec.resources.gpu if gpus_per_trial is None else float(gpus_per_trial),
    )
    if resources.cpu <= 0 or resources.gpu < 0:
        raise ValueError(f"resources per trial must be > 0 CPUs and >= 0 GPUs, got {resources.cpu} and {resources.gpu}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    if max_failures is not None and max_failures < 0:
        raise ValueError(f"--max-failures must be >= 0, got {max_failures}")
    from tre_cli.tasks import task_for_run

    planned = []
    checked_tasks = set()
    for trial in trials:
        run_dir = out_dir / RUNS_DIR / trial.name
        # The sweep owns these keys: where a trial writes, and its W&B group.
        owned = [f"run.out={yaml_scalar(str(run_dir))}", f"run.wandb.group={yaml_scalar(spec.name)}", "run.resume=null",
                 "run.results_store=null"]
        try:
            config = resolve(preset=spec.run_preset, overrides=[*trial.overrides, *sets, *owned],
                             task_overlay=task_overlay, check_device=False)
            options_key = (config.task.name, config.model.name, json.dumps(config.task.options, sort_keys=True, default=str))
            if options_key not in checked_tasks:
                # Options are checked here, not in resolve; HH also needs the model's reward model.
                task_for_run(config.task.name, config.task.options, config.model.name)
                checked_tasks.add(options_key)
        except (ValueError, FileNotFoundError) as error:
            raise type(error)(f"sweep {spec.name!r}, trial {trial.name}: {error}") from None
        planned.append(PlannedTrial(trial, run_dir, config))
    return SweepPlan(
        spec=spec,
        out=out_dir,
        tasks=chosen,
        seeds=tuple(spec.seeds if seeds is None else seeds),
        sets=tuple(sets),
        resources=resources,
        max_concurrent=spec.max_concurrent if max_concurrent is None else max_concurrent,
        max_failures=spec.max_failures if max_failures is None else max_failures,
        trials=tuple(planned),
    )


def resume_command(name: str, plan: SweepPlan) -> str:
    """The command line that continues this sweep (the options --resume checks, as given)."""
    import shlex

    words = ["tre", "sweep", name, "--out", str(plan.out), "--resume", "--preset", plan.spec.preset]
    for task in plan.tasks:
        words += ["--task", task]
    words += ["--seeds", ",".join(map(str, plan.seeds))]
    for item in plan.sets:
        words += ["--set", item]
    return shlex.join(words)


def check_out_dir(plan: SweepPlan, resume: bool) -> None:
    """A fresh sweep needs an empty --out; --resume needs the same sweep's --out."""
    manifest_file = plan.out / SWEEP_FILE
    if not resume:
        if plan.out.exists() and (not plan.out.is_dir() or any(plan.out.iterdir())):
            hint = " (add --resume to continue it)" if manifest_file.is_file() else ""
            raise ValueError(f"sweep output directory {plan.out} already exists and is not empty{hint}")
        return
    if not manifest_file.is_file():
        raise FileNotFoundError(f"nothing to resume: {manifest_file} does not exist")
    saved = json.loads(manifest_file.read_text(encoding="utf-8"))
    asked = plan.manifest()
    for key in ("sweep", "preset", "tasks", "seeds", "sets", "trials"):
        if saved.get(key) != asked[key]:
            raise ValueError(
                f"--resume: the sweep in {plan.out} was started with {key} = {saved.get(key)!r}, not {asked[key]!r}; "
                "pass the same sweep, --preset, --task, --seeds and --set"
            )


# --------------------------------------------------------------------------- progress display


@dataclass
class TrialProgress:
    """What the display shows of one trial; updated from Ray's trial events in the driver."""

    name: str
    status: str = "pending"  # pending | running | done | failed | retrying
    step: int = 0
    steps: Optional[int] = None
    reward: Optional[float] = None
    score: Optional[float] = None
    failures: int = 0
    error: Optional[str] = None


STATUS_STYLES = {"pending": "dim", "running": "cyan", "retrying": "yellow", "done": "green", "failed": "bold red"}


def progress_counts(trials: Sequence[TrialProgress]) -> Dict[str, int]:
    counts = {status: 0 for status in STATUS_STYLES}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    return counts


def _fmt(value: Optional[float]) -> str:
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

    def __enter__(self) -> "SweepDisplay":
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

    def update(self, name: str, event: str, result: Optional[Mapping[str, Any]] = None, failures: int = 0,
               error: Optional[str] = None) -> None:
        trial = self.trials.setdefault(name, TrialProgress(name))
        line = None
        with self._lock:
            if result:
                trial.step = int(result.get("step", trial.step) or trial.step)
                trial.steps = int(result["steps"]) if result.get("steps") else trial.steps
                trial.reward = result.get("reward/mean", trial.reward)
                trial.score = result.get("eval/score", trial.score)
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


# The display the Tune callback forwards to. The callback object is pickled into Tune's
# experiment state (tuner.pkl), so it holds no reference itself: a restored sweep's unpickled
# callback finds the current driver's display here.
_ACTIVE_DISPLAY: Optional[SweepDisplay] = None


# --------------------------------------------------------------------------- the trainable


def _pointer_file(directory: PathLike) -> Path:
    return Path(directory) / "tre_run.json"


def _finished_result(run_dir: Path) -> Optional[Dict[str, Any]]:
    result_file = run_dir / "result.json"
    if not result_file.is_file():
        return None
    result = json.loads(result_file.read_text(encoding="utf-8"))
    return result if result.get("status") == "finished" else None


def train_trial(trial_config: Dict[str, Any]) -> None:
    """Ray Tune's function trainable: one tre run, resumed where a previous attempt left it."""
    import torch
    from ray import tune
    from rich.console import Console

    from tre_cli import trainer

    spec = trial_config["trial"]
    name = spec["name"]
    run_dir = Path(spec["run_dir"])
    torch.set_num_threads(max(1, int(spec.get("cpus", 1))))
    config = from_dict(spec["config"], f"trial {name}")
    steps = config.ppo.steps

    finished = _finished_result(run_dir)
    if finished is not None:  # a resumed sweep whose trial had finished before Tune saved that
        tune.report({"step": finished["steps_done"], "steps": steps, "eval/score": finished.get("final_eval")})
        return

    console = Console(stderr=True, force_terminal=False, width=200)
    if spec.get("kind") == "eval":
        _set_aside_failed_attempt(run_dir)
        result = trainer.evaluate_model(config, console=console)
        tune.report({"step": 0, "steps": 0, "eval/score": result.final_eval})
        return

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            recorded = Path(json.loads(_pointer_file(directory).read_text(encoding="utf-8"))["run_dir"])
        if recorded != run_dir:
            raise ValueError(f"trial {name}: its Ray checkpoint points at {recorded}, not {run_dir}")
    # A run directory with a config is an earlier attempt of this trial (a fresh sweep refuses a
    # non-empty --out); it may have crashed before its first checkpoint, which resume handles too.
    if checkpoint is not None or (run_dir / "config.yaml").is_file():
        config = with_overrides(config, {"run.resume": str(run_dir)})

    fail_at = spec.get("fail_once_at_step")

    def on_step(step: int, metrics: Dict[str, float], checkpoint_dir: Optional[Path]) -> None:
        payload = {**metrics, "step": step, "steps": steps}
        if checkpoint_dir is None:
            tune.report(payload)
        else:
            import tempfile

            # Ray copies the directory into its storage during report(); ours holds one pointer.
            with tempfile.TemporaryDirectory(dir=run_dir, prefix=".ray-checkpoint-") as pointer_dir:
                _pointer_file(pointer_dir).write_text(json.dumps({"run_dir": str(run_dir), "step": step}))
                tune.report(payload, checkpoint=tune.Checkpoint.from_directory(pointer_dir))
        if fail_at is not None and step == int(fail_at) and not (run_dir / _FAIL_MARKER).exists():
            (run_dir / _FAIL_MARKER).write_text(f"{step}\n")
            raise RuntimeError(f"{FAIL_ONCE_ENV}={fail_at}: trial {name} fails once after step {step} (a test hook)")

    trainer.run(config, on_step=on_step, console=console)


def _set_aside_failed_attempt(run_dir: Path) -> None:
    """An evaluation has no checkpoint to continue: a failed attempt's directory moves to
    runs/.attempts/ (kept for its error, skipped by `tre report`) and the evaluation starts over."""
    if run_dir.exists() and any(run_dir.iterdir()):
        attempts = run_dir.parent / ".attempts"
        attempts.mkdir(parents=True, exist_ok=True)
        os.rename(run_dir, attempts / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def trial_param(planned: PlannedTrial, resources: Resources, fail_once_at_step: Optional[int]) -> Dict[str, Any]:
    """What Tune's param space holds for one trial: plain data only (it is pickled and restored)."""
    return {
        "name": planned.trial.name,
        "run_dir": str(planned.run_dir),
        "cpus": resources.cpu,
        "config": to_dict(planned.config),
        "fail_once_at_step": fail_once_at_step,
        "kind": planned.trial.kind,
    }


def fail_once_from_env() -> Optional[int]:
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


# --------------------------------------------------------------------------- the driver


@dataclass
class SweepOutcome:
    out: Path
    finished: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    unfinished: List[str] = field(default_factory=list)
    interrupted: bool = False
    wall_s: float = 0.0


def _private_dirs(out: Path) -> Dict[str, Path]:
    base = out / ".ray"
    return {"base": base, "temp": base / "tmp", "token": base / "auth_token", "wandb": base / "wandb"}


def _local_ray_env(out: Path) -> Dict[str, str]:
    """Environment for a local Ray cluster started by this driver.

    Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset and
    writes its token to ~/.ray/auth_token. We set the mode ourselves and keep the token under
    <out>/.ray (0600): the cluster stays authenticated, and nothing lands in the home directory.
    A user who sets RAY_AUTH_MODE / RAY_AUTH_TOKEN(_PATH) keeps their own settings.
    """
    dirs = _private_dirs(out)
    # Ray runs workers at niceness 15 to keep its own daemons responsive; here the trials ARE the
    # work, and at 15 they starve behind any other process (a retry took minutes on a busy box).
    env = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}
    if "RAY_AUTH_MODE" not in os.environ:
        env["RAY_AUTH_MODE"] = "token"
    if env.get("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "")).lower() == "token" \
            and "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        token = dirs["token"]
        if not token.is_file():
            token.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    return env


def _common_env(out: Path) -> Dict[str, str]:
    """W&B caches and Ray's output engine, for the driver and (inherited) the trials."""
    wandb_dir = _private_dirs(out)["wandb"]
    env = {
        # Our own table replaces Tune's console reporter (verbose=0 in the legacy engine is silent).
        "RAY_AIR_NEW_OUTPUT": "0",
        # Trials keep the driver's working directory, so relative paths in a config (a local
        # task.options.train_source) mean what they mean to `tre run`.
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        # Trials log to W&B themselves (Tracker: explicit steps, finished in a finally block);
        # Ray's WandbLoggerCallback is not used, so a Ctrl-C does not wait on its upload timeout.
        "WANDB_SILENT": "true",
    }
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        if var not in os.environ:
            env[var] = str(wandb_dir / sub)
    return env


# Ray puts its Unix sockets at <temp>/session_<date>_<time>_<pid>/sockets/plasma_store, and a
# socket path may not exceed 107 bytes: that leaves about 40 for <temp>.
_MAX_RAY_TEMP_LEN = 36


def temp_link_path(temp: Path) -> Path:
    """Where the short link to a Ray temp dir goes: the system temp folder, named by the target."""
    import hashlib
    import tempfile

    return Path(tempfile.gettempdir()) / f"tre-ray-{hashlib.sha1(str(temp).encode()).hexdigest()[:10]}"


def _short_temp_link(temp: Path) -> Optional[Path]:
    """A short symlink to `temp` when its path is too long for Ray's sockets, else None.

    Only the link lives in the system temp folder; every file Ray writes stays under `temp`.
    """
    if len(str(temp)) <= _MAX_RAY_TEMP_LEN:
        return None
    link = temp_link_path(temp)
    if link.is_symlink() and Path(os.readlink(link)) == temp:
        return link
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(temp, link, target_is_directory=True)
    return link


def check_local_resources(resources: Resources, num_cpus: Optional[int] = None) -> None:
    """A trial that asks for more than this machine has would wait forever in Ray's queue: say so now."""
    cpus = num_cpus or os.cpu_count() or 1
    if resources.cpu > cpus:
        raise ValueError(f"each trial asks for {resources.cpu:g} CPUs but this machine has {cpus}; "
                         "pass --cpus-per-trial (or --preset smoke), or join a cluster with --address")
    if resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if resources.gpu > gpus:
            raise ValueError(f"each trial asks for {resources.gpu:g} GPUs but this machine has {gpus}; "
                             "pass --gpus-per-trial 0 (or --preset smoke), or join a cluster with --address")


def _storage(plan: SweepPlan, storage: Optional[str]) -> str:
    """Tune's storage_path: local (default <out>/ray), a shared directory, or a cloud URI."""
    if storage is None:
        return str(plan.out / "ray")
    return storage if "://" in storage else str(Path(storage).absolute())


def run_sweep(
    plan: SweepPlan,
    *,
    resume: bool = False,
    address: Optional[str] = None,
    storage: Optional[str] = None,
    console=None,
    num_cpus: Optional[int] = None,
) -> SweepOutcome:
    """Run (or with resume=True continue) the planned sweep through Ray Tune."""
    global _ACTIVE_DISPLAY
    from rich.console import Console

    console = console or Console(stderr=True)
    check_out_dir(plan, resume)
    fail_once = fail_once_from_env()
    if address is None:
        check_local_resources(plan.resources, num_cpus)
    started = time.monotonic()

    plan.out.mkdir(parents=True, exist_ok=True)
    if not resume:
        from tre_cli.tracking import atomic_write_text

        atomic_write_text(plan.out / SWEEP_FILE, json.dumps(plan.manifest(), indent=2) + "\n")

    env = _common_env(plan.out)
    if address is None:
        env.update(_local_ray_env(plan.out))
    ray_was_imported = "ray" in sys.modules
    os.environ.update(env)  # before ray is imported: workers of a local cluster inherit it

    import ray
    from ray import tune

    if ray_was_imported and address is None:
        # Something imported ray earlier in this process (vLLM does), so its cached config and
        # token loader still hold the auth mode of that import while the cluster we start reads
        # ours from the environment: refresh both, as ray's own auth setup does.
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    link = None
    init_kwargs: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                                       logging_level="ERROR")
    if address is not None:
        init_kwargs["address"] = address
        # Workers of a cluster started elsewhere do not inherit this process's environment (W&B's
        # cache folders excepted: they are paths on this machine).
        cache_vars = ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
        init_kwargs["runtime_env"] = {"env_vars": {k: v for k, v in env.items() if k not in cache_vars}}
    else:
        temp = _private_dirs(plan.out)["temp"]
        temp.mkdir(parents=True, exist_ok=True)
        link = _short_temp_link(temp)
        init_kwargs["_temp_dir"] = str(link or temp)
        if num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**init_kwargs)
    except Exception as error:  # ray raises ConnectionError, RuntimeError, ValueError... for a bad cluster
        raise ValueError(f"cannot start or join the Ray cluster{' at ' + address if address else ''}: {error}") from None

    names = [p.trial.name for p in plan.trials]
    display = SweepDisplay(f"tre sweep {plan.spec.name} ({plan.spec.preset}): {len(names)} trials", names, console)
    for planned in plan.trials:  # a resumed sweep's finished trials send no events
        finished = _finished_result(planned.run_dir)
        if finished is not None:
            display.trials[planned.trial.name] = TrialProgress(
                planned.trial.name, "done", finished["steps_done"], planned.config.ppo.steps, score=finished.get("final_eval"))
    _ACTIVE_DISPLAY = display
    outcome = SweepOutcome(out=plan.out)
    try:
        trainable = tune.with_resources(train_trial, {"cpu": plan.resources.cpu, "gpu": plan.resources.gpu})
        storage_path = _storage(plan, storage)
        experiment = storage_path.rstrip("/") + "/" + EXPERIMENT_NAME
        if resume and tune.Tuner.can_restore(experiment):
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
            console.print(f"resuming {plan.out} ({experiment})")
        else:
            if resume:  # killed before Tune saved its state: the trials resume their run directories
                console.print(f"no Tune state in {experiment} yet: starting it again; trials continue their run directories")
            params = [trial_param(p, plan.resources, fail_once) for p in plan.trials]
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(params)},
                tune_config=tune.TuneConfig(
                    num_samples=1,
                    max_concurrent_trials=plan.max_concurrent,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT_NAME,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[_progress_callback()],
                    verbose=0,
                    log_to_file=True,
                ),
            )
        with display:
            results = tuner.fit()
        for result in results:
            name = (result.config or {}).get("trial", {}).get("name", "?")
            if result.error is not None:
                outcome.failed.append(name)
            elif (plan.out / RUNS_DIR / name / "result.json").is_file() and _finished_result(plan.out / RUNS_DIR / name):
                outcome.finished.append(name)
            else:
                outcome.unfinished.append(name)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        _ACTIVE_DISPLAY = None
        ray.shutdown()
        if address is None and link is not None:
            link.unlink(missing_ok=True)
    outcome.interrupted = outcome.interrupted or bool(outcome.unfinished)
    outcome.wall_s = time.monotonic() - started
    return outcome


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _progress_callback():
    """A Tune Callback that forwards trial events to _ACTIVE_DISPLAY (built here: ray is imported lazily)."""
    return _callback_class()()


_CALLBACK_CLASS = None


def _callback_class():
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        from ray.tune import Callback

        class SweepProgressCallback(Callback):
            def _show(self, trial, event, result=None, error=None):
                if _ACTIVE_DISPLAY is not None:
                    _ACTIVE_DISPLAY.update(_trial_name(trial), event, result,
                                           failures=int(getattr(trial, "num_failures", 0) or 0), error=error)

            def on_trial_start(self, iteration, trials, trial, **info):
                self._show(trial, "start")

            def on_trial_recover(self, iteration, trials, trial, **info):
                self._show(trial, "retry", error=_error_line(trial))

            def on_trial_restore(self, iteration, trials, trial, **info):
                self._show(trial, "start")

            def on_trial_result(self, iteration, trials, trial, result, **info):
                self._show(trial, "result", result)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._show(trial, "complete", trial.last_result)

            def on_trial_error(self, iteration, trials, trial, **info):
                self._show(trial, "error", trial.last_result, error=_error_line(trial))

        SweepProgressCallback.__module__ = __name__
        SweepProgressCallback.__qualname__ = "SweepProgressCallback"
        globals()["SweepProgressCallback"] = SweepProgressCallback  # so pickle finds it by name
        _CALLBACK_CLASS = SweepProgressCallback
    return _CALLBACK_CLASS


def _error_line(trial) -> str:
    """The last line of a failed trial's error file, if Tune wrote one."""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8").strip().splitlines() if path else []
    except OSError:
        text = []
    return text[-1][:200] if text else "error"


def __getattr__(name: str):
    # Unpickling a restored sweep's callback asks for the class before any sweep has built it.
    if name == "SweepProgressCallback":
        return _callback_class()
    raise AttributeError(name)
