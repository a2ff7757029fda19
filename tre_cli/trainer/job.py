"""A whole job: `run(config)` trains (fresh, or continuing `run.resume`), `resume(run_dir)`
continues a run directory, `evaluate_model(config)` is `tre eval`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from collections.abc import Callable

from tre_cli import metrics as M
from tre_cli.config import RunConfig, load_run_config, resolve_device, with_overrides
from tre_cli.evaluation import EvalResult, evaluate
from tre_cli.io import truncate_jsonl_after
from tre_cli.losses.estimators import needs_critic
from tre_cli.losses.registry import BASE
from tre_cli.rollout.base import RolloutEngine
from tre_cli.tasks import TaskProtocol
from tre_cli.tracking import RunDir, RunResult, Tracker, default_run_dir, open_run_dir
from tre_cli.trainer import distributed
from tre_cli.trainer.checkpoint import (
    load_checkpoint,
    load_checkpoint_workers,
    read_trainer_state,
    save_checkpoint,
    save_checkpoint_workers,
)
from tre_cli.trainer.follow import StepFollower, checkpoints_at, evaluates_at, run_and_follow
from tre_cli.trainer.parts import (
    Parts,
    build,
    check_hf_batch_memory,
    encode_prompt,
    make_engine,
    eval_stream,
    plan_context,
    seed_everything,
    task_and_examples,
)
from tre_cli.trainer.progress import NO_PHASES, Phases, progress_bar, progress_line, quiet_transformers, show_progress
from tre_cli.trainer.step import train_step

# on_step(step, metrics, checkpoint_dir or None): how a sweep trial hears about progress.
StepCallback = Callable[[int, dict[str, float], Path | None], None]


def run(config: RunConfig, on_step: StepCallback | None = None, console: Any = None,
        workers_gpu: bool | None = None) -> RunResult:
    """Train with `config`: a fresh run, or (`run.resume` set) the continuation of that run directory.
    `console`: where the per-step lines go (default: stderr; `tre run` gives its stdout console);
    progress goes to stderr.
    `workers_gpu` (run.workers > 1): whether each worker takes a GPU, when this process cannot
    tell from its own devices (a sweep trial's, which holds none); default: run.device here."""
    if config.run.resume:
        display = {"run.progress": config.run.progress, "run.verbose": config.run.verbose}
        return resume(config.run.resume, on_step=on_step, console=console, display=display, workers_gpu=workers_gpu)
    if config.run.workers > 1:
        return _launch(config, Path(config.run.out) if config.run.out else default_run_dir(config), False, on_step,
                       workers_gpu)
    return _train(config, config.run.out, None, on_step, console, _OneProcess())


def resume(run_dir: str | Path, on_step: StepCallback | None = None, console: Any = None,
           display: dict[str, Any] | None = None, workers_gpu: bool | None = None) -> RunResult:
    """Continue a run directory from its latest checkpoint, with the config it recorded;
    `display` may change its run.progress and run.verbose (they change what is shown only)."""
    opened = open_run_dir(run_dir)
    unknown = set(display or {}) - {"run.progress", "run.verbose"}
    if unknown:
        raise ValueError(f"a resumed run keeps its config; only run.progress and run.verbose may change, "
                         f"got {', '.join(sorted(unknown))}")
    config = with_overrides(load_run_config(opened.path), {"run.resume": str(opened.path), **(display or {})})
    if config.run.workers > 1:
        return _launch(config, opened.path, True, on_step, workers_gpu)
    latest = opened.latest_checkpoint()
    # Read (and vet) the trainer state before anything is built or written.
    state = read_trainer_state(latest[1], needs_critic(config.ppo.estimator)) if latest else None
    return _train(config, opened.path, latest[0] if latest else 0, on_step, console, _OneProcess(state))


def _console(console: Any = None) -> Any:
    """`console`, or (None) a new rich console on stderr: the per-step lines' default, and
    where progress is drawn."""
    if console is not None:
        return console
    from rich.console import Console

    return Console(stderr=True)


class _OneProcess:
    """What the training loop does as a run's only process: it loads and saves whole
    checkpoints, shows progress, and shows the libraries' warnings with run.verbose."""

    workers = distributed.SINGLE
    shows_progress = True
    header = ""

    def __init__(self, trainer_state: dict[str, Any] | None = None) -> None:
        self.trainer_state = trainer_state  # the resumed checkpoint's trainer.pt, already read and vetted

    def verbose(self, config: RunConfig) -> bool:
        return config.run.verbose

    def load(self, parts: Parts, tracker: Tracker | None, run_dir: Path | None, step: int) -> int:
        return load_checkpoint(parts, tracker.run_dir.checkpoint_dir(step), self.trainer_state)

    def agree(self, config: RunConfig | None) -> RunConfig:
        return config

    def save(self, parts: Parts, tracker: Tracker | None, step: int) -> Path:
        return save_checkpoint(parts, tracker, step)

    def step_starts(self, step: int, run_dir: Path | None) -> None:
        pass

    def step_ends(self) -> None:
        pass


class _Workers(_OneProcess):
    """What the training loop does as one of a run's workers (trainer.distributed): sharded
    checkpoints (collectives), rank 0's config for all, a barrier after every step, the
    EXIT_AT_ENV test hook, no progress display and no library warnings."""

    shows_progress = False

    def __init__(self, workers: distributed.Workers) -> None:
        super().__init__()
        self.workers = workers
        self.header = f" ({workers.world} workers)"

    def verbose(self, config: RunConfig) -> bool:
        return False

    def load(self, parts: Parts, tracker: Tracker | None, run_dir: Path | None, step: int) -> int:
        return load_checkpoint_workers(parts, RunDir(Path(run_dir)).checkpoint_dir(step))

    def agree(self, config: RunConfig | None) -> RunConfig:
        return distributed.broadcast_object(config)

    def save(self, parts: Parts, tracker: Tracker | None, step: int) -> Path:
        return save_checkpoint_workers(parts, tracker, step)

    def step_starts(self, step: int, run_dir: Path | None) -> None:
        distributed.exit_if_asked(step, self.workers, run_dir)

    def step_ends(self) -> None:
        distributed.barrier()


def _train(config: RunConfig, run_dir: str | Path | None, resume_step: int | None, on_step: StepCallback | None,
           console: Any, crew: _OneProcess) -> RunResult | None:
    """The training loop of a run's only process or of each of its workers (`crew` says what
    differs). Every process trains; the main one (rank 0, or the only one) alone writes the run
    directory, evaluates, prints and returns the RunResult (None elsewhere)."""
    console = _console(console)
    quiet_transformers(crew.verbose(config))
    resolve_device(config.run.device)  # fail before any file is written
    seed_everything(config.run.seed)
    parts = build(config)
    tracker = Tracker(config, run_dir, resume_step=resume_step) if crew.workers.main else None
    with tracker if tracker is not None else contextlib.nullcontext():
        start = 1
        if resume_step:
            start = crew.load(parts, tracker, run_dir, resume_step) + 1
        cfg = parts.config = crew.agree(tracker.config if tracker is not None else None)
        if tracker is not None:
            what = f"resumed[/] {tracker.path} from step {start - 1}" if resume_step else f"run[/] {tracker.path}"
            console.print(f"[bold]{what}{crew.header}")
        steps = cfg.ppo.steps
        step = start - 1
        shown = _console()
        how = show_progress(cfg.run.progress, shown, cfg.run.verbose) if crew.shows_progress else "none"
        bar = progress_bar(shown, steps, start - 1, how)

        def evaluated_at(step: int) -> EvalResult:
            return run_eval(cfg, parts.engine, parts.task, parts.test, parts.test_prompts, step, tracker, bar.phases)

        try:
            if tracker is not None and cfg.eval.before_train and start == 1 and not tracker.has_eval(0):
                evaluated = evaluated_at(0)
                console.print(
                    f"step {0:>4}/{steps}  [bold]eval {evaluated.metric} {evaluated.score:.3f}[/] (before training)"
                )
            for step in range(start, steps + 1):
                crew.step_starts(step, run_dir)
                metrics = train_step(parts, step, bar.phases)
                evaluated = None
                if tracker is not None:
                    tracker.log(metrics, step=step)
                    if evaluates_at(cfg, step):
                        evaluated = evaluated_at(step)
                        metrics = {**metrics, M.EVAL_SCORE: evaluated.score}
                checkpoint = None
                if checkpoints_at(cfg, step):
                    checkpoint = crew.save(parts, tracker, step)
                if tracker is not None:
                    console.print(progress_line(step, steps, metrics, evaluated), soft_wrap=True)
                bar.advance(metrics)
                if on_step is not None:
                    on_step(step, metrics, checkpoint)
                crew.step_ends()
        finally:
            bar.stop()
        result = tracker.finish("finished", steps_done=step) if tracker is not None else None
    parts.engine.close()
    return result


def _launch(config: RunConfig, run_dir: Path, resuming: bool, on_step: StepCallback | None,
            use_gpu: bool | None = None) -> RunResult:
    """run.workers processes through Ray Train (cluster.workers.run_workers); this
    process waits and returns the RunResult rank 0 wrote. A worker that fails fails the worker
    group; it is started again, resuming from the last checkpoint, up to run.worker_retries
    times, and then the run fails (WorkerFailure). With `on_step` (a sweep trial), this process
    follows rank 0's run directory and reports each step (trainer.follow). `use_gpu`: whether
    the workers take a GPU each (a sweep trial says so: its own process holds none); by
    default, what run.device resolves to here."""
    from tre_cli.config import to_dict
    from tre_cli.cluster import WorkerFailure
    from tre_cli.cluster.workers import run_workers

    if use_gpu is None:
        use_gpu = resolve_device(config.run.device) == "cuda"  # fail before any worker starts
    retries = config.run.worker_retries
    for attempt in range(retries + 1):
        resumes = resuming or attempt > 0
        payload = {"config": to_dict(config), "run_dir": str(run_dir), "resuming": resumes}

        def start(payload: dict[str, Any] = payload) -> None:
            run_workers(worker_main, payload, config.run.workers, use_gpu=use_gpu)

        try:
            if on_step is None:
                start()
            else:
                run_and_follow(start, StepFollower(run_dir, config, _forget_after_checkpoint(run_dir, resumes)),
                               on_step)
            break
        except WorkerFailure as failure:
            if attempt == retries:
                raise
            _console(None).print(f"[yellow]{failure}[/]; starting the workers again from the last checkpoint "
                                 f"(retry {attempt + 1} of {retries})")
    return read_run_result(run_dir)


def _forget_after_checkpoint(run_dir: Path, resuming: bool) -> int:
    """The step the workers start after: 0 for a fresh run, else the last checkpoint's, whose
    later log records (of an attempt that died) are dropped now, as rank 0's tracker will do,
    so that the follower never reports them."""
    if not resuming or not (Path(run_dir) / "config.yaml").is_file():
        return 0
    opened = open_run_dir(run_dir)
    latest = opened.latest_checkpoint()
    step = latest[0] if latest else 0
    for path in (opened.metrics_file, opened.eval_file):
        truncate_jsonl_after(path, step)
    return step


def read_run_result(run_dir: str | Path) -> RunResult:
    import json
    import dataclasses

    data = json.loads(open_run_dir(run_dir).result_file.read_text())
    return RunResult(**{f.name: data[f.name] for f in dataclasses.fields(RunResult)})


def worker_main(payload: dict[str, Any]) -> None:
    """One worker of a run.workers > 1 run (torch.distributed already initialised by its launcher)."""
    import torch

    from tre_cli.config import from_dict

    torch.set_num_threads(distributed.CPUS_PER_WORKER)
    config = from_dict(payload["config"], "run.workers payload")
    run_dir = Path(payload["run_dir"])
    resume_step = None
    if payload["resuming"]:
        latest = open_run_dir(run_dir).latest_checkpoint()
        resume_step = latest[0] if latest else 0
    workers = distributed.current_workers()
    if not workers.many:
        raise RuntimeError("run.workers > 1: torch.distributed is not initialised in this worker")
    _train(config, run_dir, resume_step, None, None, _Workers(workers))


def metric_of(config: RunConfig) -> str:
    """The evaluation metric: eval.metric, or (null) the task's own."""
    from tre_cli.tasks import task_metric

    return config.eval.metric or task_metric(config.task.name)


EVAL = "eval"


def run_eval(config: RunConfig, engine: RolloutEngine, task: TaskProtocol, examples: list[dict],
             prompts: list[list[int]], step: int, tracker: Tracker, phases: Phases = NO_PHASES) -> EvalResult:
    """The evaluation protocol after `step` (0: before training, and `tre eval`) on `examples`
    and their encoded `prompts`, recorded in eval.jsonl by `tracker`."""
    phases.start(EVAL, len(examples) * config.eval.n_samples, "sequences")
    result = evaluate(engine, task, examples, prompts, n_samples=config.eval.n_samples,
                      temperature=config.eval.temperature, top_p=config.eval.top_p,
                      max_new_tokens=config.rollout.max_new_tokens, metric=metric_of(config),
                      stream=eval_stream(step), progress=phases.counter(EVAL), stop=config.rollout.stop)
    phases.done(EVAL)
    tracker.log_eval(step=step, score=result.score, metric=result.metric, n_prompts=result.n_prompts,
                     n_samples=result.n_samples, extra=result.extra())
    return result


def evaluate_model(config: RunConfig, console: Any = None) -> RunResult:
    """`tre eval`: the evaluation protocol on a model or checkpoint, recorded as a run directory
    whose result is labelled Base (Table 1's Base row) and whose eval.jsonl has step 0."""
    from tre_cli.models import load_policy, load_tokenizer, resolve_model
    console = _console(console)
    quiet_transformers(config.run.verbose)
    device = resolve_device(config.run.device)
    seed_everything(config.run.seed)
    model_path = resolve_model(config.model.name)
    max_model_len = plan_context(config, model_path)
    check_hf_batch_memory(config, model_path, device)
    tokenizer = load_tokenizer(model_path)
    task, _, test = task_and_examples(config, tokenizer, train=False)
    policy = load_policy(model_path, dtype=config.model.dtype, device=device) if config.rollout.engine == "hf" else None
    engine = make_engine(config, model_path, tokenizer, device, policy, max_model_len=max_model_len)
    prompts = [encode_prompt(task, ex, tokenizer, config.ppo.max_prompt_length) for ex in test]
    with Tracker(config, config.run.out) as tracker:
        console.print(f"[bold]eval[/] {config.model.name} on {len(test)} {config.task.name} test prompts "
                      f"x {config.eval.n_samples} samples -> {tracker.path}")
        shown = _console()
        bar = progress_bar(shown, None, 0, show_progress(config.run.progress, shown, config.run.verbose))
        try:
            run_eval(config, engine, task, test, prompts, 0, tracker, bar.phases)
        finally:
            bar.stop()
        run_result = tracker.finish("finished", steps_done=0, method=BASE)
    engine.close()
    return run_result
