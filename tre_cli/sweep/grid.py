"""The grid of a sweep: one Trial per task x model x T x variant x seed, each with the config
values it sets (values, never text: the config merges them as they are), and the plan: every
trial's RunConfig resolved and checked before anything runs, and how many of its trials a Ray
cluster runs at once (concurrency_limit)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from tre_cli.cluster import CPUS_PER_WORKER
from tre_cli.config import RunConfig, resolve
from tre_cli.losses.registry import baseline
from tre_cli.sweep.spec import BASE_VARIANT, PathLike, Resources, SweepSpec, Variant, load_sweep
from tre_cli.tracking import model_label

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"


@dataclass(frozen=True)
class Trial:
    """One job of the grid: `values` are the config values it sets, (dotted key, value) pairs
    applied in order (the sweep's `set`, the variant's, then the grid's own keys)."""

    name: str
    task: str
    model: str
    max_new_tokens: int | None
    variant: str
    seed: int
    values: tuple[tuple[str, Any], ...]
    # "train": trainer.run; "eval": trainer.evaluate_model (a Base evaluation, no training).
    kind: str = "train"


def _safe_label(model: str) -> str:
    """A model's short name for trial names: its label, made filesystem-safe."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in model_label(model))


def select_tasks(spec: SweepSpec, tasks: Sequence[str] = ()) -> tuple[str, ...]:
    """The tasks to run: those asked for (each must be one of the sweep's), else all of them."""
    if not tasks:
        return spec.tasks
    for task in tasks:
        if task not in spec.tasks:
            raise ValueError(
                f"sweep {spec.name!r} (preset {spec.preset}) runs on {', '.join(spec.tasks)}; "
                f"--task {task} is not one of them"
            )
    return tuple(dict.fromkeys(tasks))


def _grid_variants(spec: SweepSpec) -> tuple[Variant, ...]:
    # Base is evaluated like the baseline's starting point: the method only names the config's defaults.
    base = (Variant(BASE_VARIANT, baseline().name, {}, {}),) if spec.base else ()
    return base + spec.variants


def expand_grid(spec: SweepSpec, tasks: Sequence[str] = (), seeds: Sequence[int] | None = None) -> list[Trial]:
    """Every trial of the sweep: tasks x models x T x variants x seeds, in that nesting order.

    Pure: no files, no Ray. The model appears in trial names only when the sweep has several.
    """
    chosen = select_tasks(spec, tasks)
    seed_list = tuple(spec.seeds if seeds is None else seeds)
    if not seed_list:
        raise ValueError("--seeds must name at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seed_list) or len(set(seed_list)) != len(
        seed_list
    ):
        raise ValueError(f"seeds must be distinct integers >= 0, got {list(seed_list)}")
    trials = []
    for task in chosen:
        horizons: tuple[int | None, ...] = (None,)
        if spec.max_new_tokens and task in spec.max_new_tokens:
            horizons = spec.max_new_tokens[task]
        for model in spec.models:
            for horizon in horizons:
                for variant in _grid_variants(spec):
                    for seed in seed_list:
                        parts = [task]
                        if len(spec.models) > 1:
                            parts.append(_safe_label(model))
                        if horizon is not None:
                            parts.append(f"T{horizon}")
                        parts += [variant.name, f"s{seed}"]
                        grid = {"task.name": task, "model.name": model, "method.name": variant.method}
                        grid.update({f"method.{k}": v for k, v in variant.params.items()})
                        if horizon is not None:
                            grid["rollout.max_new_tokens"] = horizon
                        grid["run.seed"] = seed
                        values = (*spec.set.items(), *spec.task_set.get(task, {}).items(),
                                  *spec.model_set.get(model, {}).items(), *variant.set.items(), *grid.items())
                        kind = "eval" if variant.name == BASE_VARIANT else "train"
                        trials.append(Trial("-".join(parts), task, model, horizon, variant.name, seed, values, kind))
    names = [t.name for t in trials]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep {spec.name!r} gives two trials the same name: {duplicates[0]} (rename a variant)")
    return trials


@dataclass(frozen=True)
class PlannedTrial:
    trial: Trial
    run_dir: Path
    config: RunConfig


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    out: Path
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    sets: tuple[str, ...]
    resources: Resources
    max_concurrent: int | None
    max_failures: int
    trials: tuple[PlannedTrial, ...]
    # With plan_sweep(keep_going=True): one line per trial left out for a problem in its config.
    problems: tuple[str, ...] = ()

    def manifest(self) -> dict[str, Any]:
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
    preset: str | None = None,
    sets: Sequence[str] = (),
    out: PathLike | None = None,
    seeds: Sequence[int] | None = None,
    *,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    max_concurrent: int | None = None,
    max_failures: int | None = None,
    task_overlay: Any = None,
    keep_going: bool = False,
) -> SweepPlan:
    """The sweep's trials, each with its resolved RunConfig; raises before anything is written.

    `sets` (the CLI's --set) apply to every trial above the grid's values. `task_overlay` is
    config.resolve's (tests use small tasks). A bad config key or value raises at once. With
    `keep_going` (a dry run) a trial whose task cannot be built for it (its options, HH's reward
    model) is left out and its error kept in `problems`, so every such trial is named in one pass.
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
    problems: list[str] = []
    checked_tasks: dict[tuple, str | None] = {}  # task options -> their error, checked once
    for trial in trials:
        run_dir = out_dir / RUNS_DIR / trial.name
        # The sweep owns these keys: where a trial writes, and its W&B group.
        owned = [("run.out", str(run_dir)), ("run.wandb.group", spec.name), ("run.resume", None),
                 ("run.results_store", None)]
        try:
            config = resolve(preset=spec.run_preset, overrides=[*trial.values, *sets, *owned],
                             task_overlay=task_overlay, check_device=False)
        except (ValueError, FileNotFoundError) as error:  # a bad key or value: one line, at once
            raise type(error)(f"sweep {spec.name!r}, trial {trial.name}: {error}") from None
        options_key = (config.task.name, config.model.name,
                       json.dumps(config.task.options, sort_keys=True, default=str))
        if options_key not in checked_tasks:
            # Options are checked here, not in resolve; HH also needs the model's reward model.
            try:
                task_for_run(config.task.name, config.task.options, config.model.name)
                checked_tasks[options_key] = None
            except (ValueError, FileNotFoundError) as error:
                checked_tasks[options_key] = str(error)
                if not keep_going:
                    raise type(error)(f"sweep {spec.name!r}, trial {trial.name}: {error}") from None
        if checked_tasks[options_key] is not None:
            problems.append(f"sweep {spec.name!r}, trial {trial.name}: {checked_tasks[options_key]}")
            continue
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
        problems=tuple(problems),
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


def worker_demand(planned: PlannedTrial, resources: Resources) -> Resources:
    """What a trial holds while it runs: its own reservation plus its workers' (one GPU each,
    or CPUS_PER_WORKER CPUs each on CPU)."""
    workers = planned.config.run.workers
    if workers <= 1 or planned.trial.kind != "train":
        return resources
    if resources.gpu > 0:
        return Resources(cpu=float(workers), gpu=float(workers))
    return Resources(cpu=float(workers * CPUS_PER_WORKER), gpu=0.0)


def concurrency_limit(plan: SweepPlan, cluster: dict[str, float]) -> int | None:
    """How many trials may run at once: the plan's max_concurrent, and, when a trial has
    several workers (which Tune does not reserve), no more than the cluster holds of the
    largest trial's demand. A trial bigger than the cluster is an error."""
    if all(p.config.run.workers <= 1 for p in plan.trials):
        return plan.max_concurrent
    demands = [worker_demand(p, plan.resources) for p in plan.trials]
    fits = []
    for demand in demands:
        for name, need in (("CPU", demand.cpu), ("GPU", demand.gpu)):
            have = float(cluster.get(name, 0.0))
            if need > 0:
                if need > have:
                    raise ValueError(f"a trial's run.workers needs {need:g} {name}s and the Ray cluster has {have:g}; "
                                     "lower run.workers or join a bigger cluster with --address")
                fits.append(int(have // need))
    limit = min(fits) if fits else None
    if plan.max_concurrent is not None:
        limit = plan.max_concurrent if limit is None else min(limit, plan.max_concurrent)
    return limit
