"""A whole job: `run(config)` trains (fresh, or continuing `run.resume`), `resume(run_dir)`
continues a run directory, `evaluate_model(config)` is `tre eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Callable

from tre_cli.config import RunConfig, load_run_config, resolve_device, with_overrides
from tre_cli.evaluation import EvalResult, evaluate
from tre_cli.losses.registry import BASE
from tre_cli.tracking import RunResult, Tracker, open_run_dir
from tre_cli.trainer.checkpoint import load_checkpoint, read_trainer_state, save_checkpoint
from tre_cli.trainer.parts import (
    Parts,
    build,
    encode_prompt,
    make_engine,
    max_new_tokens_of,
    seed_everything,
    task_and_examples,
)
from tre_cli.trainer.progress import Phases, progress_bar, progress_line, quiet_transformers, show_progress
from tre_cli.trainer.step import train_step

# on_step(step, metrics, checkpoint_dir or None): how a sweep trial hears about progress.
StepCallback = Callable[[int, dict[str, float], Path | None], None]


def run(config: RunConfig, on_step: StepCallback | None = None, console: Any = None) -> RunResult:
    """Train with `config`: a fresh run, or (`run.resume` set) the continuation of that run directory.
    `console`: where the per-step lines go (default stdout); progress goes to stderr."""
    if config.run.resume:
        display = {"run.progress": config.run.progress, "run.verbose": config.run.verbose}
        return resume(config.run.resume, on_step=on_step, console=console, display=display)
    return _train(config, config.run.out, None, None, on_step, console)


def resume(run_dir: str | Path, on_step: StepCallback | None = None, console: Any = None,
           display: dict[str, Any] | None = None) -> RunResult:
    """Continue a run directory from its latest checkpoint, with the config it recorded;
    `display` may change its run.progress and run.verbose (they change what is shown only)."""
    opened = open_run_dir(run_dir)
    unknown = set(display or {}) - {"run.progress", "run.verbose"}
    if unknown:
        raise ValueError(f"a resumed run keeps its config; only run.progress and run.verbose may change, "
                         f"got {', '.join(sorted(unknown))}")
    config = with_overrides(load_run_config(opened.path), {"run.resume": str(opened.path), **(display or {})})
    latest = opened.latest_checkpoint()
    # Read (and vet) the trainer state before anything is built or written.
    state = read_trainer_state(latest[1]) if latest else None
    return _train(config, opened.path, latest[0] if latest else 0, state, on_step, console)


def _console(console: Any) -> Any:
    if console is not None:
        return console
    from rich.console import Console

    return Console(stderr=True)


def _progress_console() -> Any:
    """The console progress is drawn on: stderr (the per-step lines and logs keep stdout)."""
    from rich.console import Console

    return Console(stderr=True)


def _train(config: RunConfig, run_dir: str | Path | None, resume_step: int | None,
           trainer_state: dict[str, Any] | None, on_step: StepCallback | None, console: Any) -> RunResult:
    console = _console(console)
    quiet_transformers(config.run.verbose)
    resolve_device(config.run.device)  # fail before any file is written
    seed_everything(config.run.seed)
    parts = build(config)
    with Tracker(config, run_dir, resume_step=resume_step) as tracker:
        start = 1
        if resume_step:
            loaded = load_checkpoint(parts, tracker.run_dir.checkpoint_dir(resume_step), trainer_state)
            start = loaded + 1
            console.print(f"[bold]resumed[/] {tracker.path} from step {loaded}")
        else:
            console.print(f"[bold]run[/] {tracker.path}")
        cfg = parts.config = tracker.config
        steps = cfg.ppo.steps
        step = start - 1
        shown = _progress_console()
        bar = progress_bar(shown, steps, start - 1, show_progress(cfg.run.progress, shown, cfg.run.verbose))
        try:
            if cfg.eval.before_train and start == 1 and not tracker.has_eval(0):
                evaluated = run_eval(parts, 0, tracker, bar.phases)
                console.print(
                    f"step {0:>4}/{steps}  [bold]eval {evaluated.metric} {evaluated.score:.3f}[/] (before training)"
                )
            for step in range(start, steps + 1):
                metrics = train_step(parts, step, bar.phases)
                tracker.log(metrics, step=step)
                evaluated = None
                if (cfg.eval.every and step % cfg.eval.every == 0) or step == steps:
                    evaluated = run_eval(parts, step, tracker, bar.phases)
                    metrics = {**metrics, "eval/score": evaluated.score}
                checkpoint = None
                if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == steps:
                    checkpoint = save_checkpoint(parts, tracker, step)
                console.print(progress_line(step, steps, metrics, evaluated), soft_wrap=True)
                bar.advance(metrics)
                if on_step is not None:
                    on_step(step, metrics, checkpoint)
        finally:
            bar.stop()
        result = tracker.finish("finished", steps_done=step)
    parts.engine.close()
    return result


def metric_of(config: RunConfig) -> str:
    """The evaluation metric: eval.metric, or (null) the task's own."""
    from tre_cli.tasks import task_metric

    return config.eval.metric or task_metric(config.task.name)


EVAL = "eval"


def run_eval(parts: Parts, step: int, tracker: Tracker | None, phases: Phases | None = None) -> EvalResult:
    cfg = parts.config
    phases = phases or Phases()
    phases.start(EVAL, len(parts.test) * cfg.eval.n_samples, "sequences")
    result = evaluate(parts.engine, parts.task, parts.test, parts.test_prompts, n_samples=cfg.eval.n_samples,
                      temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, max_new_tokens=parts.max_new_tokens,
                      metric=metric_of(cfg), progress=phases.counter(EVAL))
    phases.done(EVAL)
    if tracker is not None:
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
    max_new_tokens = max_new_tokens_of(config)
    seed_everything(config.run.seed)
    model_path = resolve_model(config.model.name)
    tokenizer = load_tokenizer(model_path)
    task, _, test = task_and_examples(config, tokenizer, train=False)
    policy = load_policy(model_path, dtype=config.model.dtype, device=device) if config.rollout.engine == "hf" else None
    engine = make_engine(config, model_path, tokenizer, device, policy)
    prompts = [encode_prompt(task, ex, tokenizer, config.ppo.max_prompt_length) for ex in test]
    with Tracker(config, config.run.out) as tracker:
        console.print(f"[bold]eval[/] {config.model.name} on {len(test)} {config.task.name} test prompts "
                      f"x {config.eval.n_samples} samples -> {tracker.path}")
        shown = _progress_console()
        bar = progress_bar(shown, None, 0, show_progress(config.run.progress, shown, config.run.verbose))
        bar.phases.start(EVAL, len(test) * config.eval.n_samples, "sequences")
        try:
            result = evaluate(engine, task, test, prompts, n_samples=config.eval.n_samples,
                              temperature=config.eval.temperature, top_p=config.eval.top_p,
                              max_new_tokens=max_new_tokens, metric=metric_of(config),
                              progress=bar.phases.counter(EVAL))
            bar.phases.done(EVAL)
        finally:
            bar.stop()
        tracker.log_eval(step=0, score=result.score, metric=result.metric, n_prompts=result.n_prompts,
                         n_samples=result.n_samples, extra=result.extra())
        run_result = tracker.finish("finished", steps_done=0, method=BASE)
    engine.close()
    return run_result
