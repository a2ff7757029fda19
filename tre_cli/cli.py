"""The `tre` command line: parse, validate, dispatch. No training logic lives here."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tre_cli import __version__
from tre_cli.losses.registry import DEFAULT_METHOD, baseline

app = typer.Typer(
    name="tre",
    help="PPO fine-tuning of language models with Trust Region Entropy (TRE) and its baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tre {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool | None = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """tre: exploration in the trust region for RL on language models."""


@app.command()
def methods() -> None:
    """List the training methods with their parameters, defaults and what each does."""
    from tre_cli.losses.registry import METHODS

    table = Table(title="tre methods", show_lines=False)
    table.add_column("method", style="bold")
    table.add_column("parameters (defaults)")
    table.add_column("what it does")
    for method in METHODS.values():
        params = ", ".join(f"{k}={v}" for k, v in method.defaults.items()) or "-"
        table.add_row(method.name, params, method.summary)
    console.print(table)


@contextmanager
def _one_line_errors():
    """Bad input is one line naming the problem and a non-zero exit, never a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)
    except RuntimeError as error:  # a worker of run.workers > 1 died or raised
        from tre_cli.cluster import WorkerFailure

        if not isinstance(error, WorkerFailure):
            raise
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1)


VERBOSE_HELP = ("Show the rollout engines' and transformers' own logs (quiet by default) and progress within "
                "a step even when stderr is not a terminal (run.verbose=true).")


def _resolve_run_config(method, task, model, preset, config, sets, out, rollout, device):
    from tre_cli.config import resolve

    overrides = list(sets)
    for key, value in (("run.out", out), ("rollout.engine", rollout), ("run.device", device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return resolve(task=task, method=method, model=model, preset=preset, config_file=config, overrides=overrides)


@app.command()
def run(
    method: str | None = typer.Option(None, help=f"Training method (see `tre methods`); default {DEFAULT_METHOD}."),
    task: str | None = typer.Option(None, help="math, countdown or hh; default countdown."),
    model: str | None = typer.Option(None, help="Hub id, local directory, or `testbed` (ships with tre)."),
    preset: str | None = typer.Option(
        None, help="smoke (testbed, 2 CPU cores, minutes), small (a real model of a few 100M parameters on "
        "a CPU: pass --model) or paper (Table 2)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config sections."),
    sets: list[str] = typer.Option([], "--set", help="Override a config key: --set ppo.actor_lr=1e-6 (repeatable)."),
    out: Path | None = typer.Option(None, help="Run directory (must not exist or be empty)."),
    rollout: str | None = typer.Option(None, help="Rollout engine: hf or vllm."),
    device: str | None = typer.Option(None, help="cpu, cuda or auto."),
    resume: Path | None = typer.Option(None, help="Continue this run directory from its last checkpoint."),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Run one PPO fine-tuning job."""
    from tre_cli import trainer
    from tre_cli.config import resolve_device

    with _one_line_errors():
        if resume is not None:
            if any(v is not None for v in (method, task, model, preset, config, out, rollout)) or sets:
                raise ValueError("--resume takes the run directory's own config; pass no other options")
            if device is not None:
                resolve_device(device)
            result = trainer.resume(resume, console=console, display={"run.verbose": True} if verbose else None)
        else:
            sets = [*sets, "run.verbose=true"] if verbose else sets
            cfg = _resolve_run_config(method, task, model, preset, config, sets, out, rollout, device)
            result = trainer.run(cfg, console=console)
    console.print(f"[bold green]done[/] {result.run_dir}: final {result.eval_metric} {result.final_eval}")


@app.command()
def report(
    runs: list[Path] | None = typer.Argument(
        None, help="Run directories and/or directories of runs or results stores (results.jsonl)."
    ),
    out: Path = typer.Option(Path("report"), "--out", help="Where the tables and figures go."),
    wandb_project: str | None = typer.Option(
        None, "--wandb", help="Read the runs of this W&B project (ENTITY/PROJECT)."
    ),
    score: str = typer.Option("final", "--score", help="final: the last eval score; best: the best one."),
    log_wandb: bool | None = typer.Option(
        None,
        "--log-wandb/--no-log-wandb",
        help="Log the tables and figures to W&B; default: when --wandb is given or the runs logged online.",
    ),
) -> None:
    """Table 1 (terminal, Markdown, CSV, LaTeX), the mechanism table (Markdown, CSV), Figures 1, 3, 4 and
    the mechanism figure (PNG, SVG) from finished runs."""
    from tre_cli import report as report_lib
    from tre_cli import tracking

    try:
        loaded = report_lib.load_local_runs(runs or [])
        if wandb_project:
            loaded += tracking.read_wandb_project(wandb_project)
        target = report_lib.wandb_target(loaded, wandb_project, log_wandb)
        written = report_lib.write_report(loaded, out, score)
    except (ValueError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    console.print(report_lib.render_rich(written.table))
    for line in written.notes + written.skipped:
        console.print(line, style="yellow", markup=False)
    console.print(
        f"[bold green]wrote[/] {len(written.written)} files to {out}: " + ", ".join(p.name for p in written.written)
    )
    if target is not None:
        entity, project, mode = target
        tables, images = report_lib.wandb_payload(written)
        run_id = tracking.log_report_to_wandb(project, entity, mode, out, tables, images)
        if run_id:
            console.print(f"logged the report to W&B ({mode}): {entity + '/' if entity else ''}{project}, run {run_id}")


@app.command()
def sweep(
    name: str = typer.Argument(
        ..., help="horizon (Figure 1), hparam (Figure 4), main (Table 1, Figure 3), mechanism (P_max and the tail "
             "against the step, with seed bands), or a sweep YAML file."
    ),
    tasks: list[str] = typer.Option(
        [], "--task", help="Run only this task of the sweep (repeatable); default: all of the preset's."
    ),
    preset: str | None = typer.Option(
        None, help="paper (default: the paper's grid), smoke (2 CPU cores, minutes), or another the sweep file names."
    ),
    sets: list[str] = typer.Option(
        [], "--set", help="Override a config key in every trial: --set ppo.steps=100 (repeatable)."
    ),
    seeds: str | None = typer.Option(None, help="Seeds as a comma list (0,1,2); default: the sweep file's."),
    out: Path | None = typer.Option(
        None, help="Sweep directory (runs/, Ray state); default runs/sweep-NAME-TASKS-PRESET."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted sweep in --out (same options)."),
    address: str | None = typer.Option(
        None, help="Join this Ray cluster (e.g. auto or HOST:6379) instead of starting one."
    ),
    storage: str | None = typer.Option(
        None, help="Ray Tune storage: a local or shared directory or a cloud URI; default OUT/ray."
    ),
    cpus_per_trial: float | None = typer.Option(None, help="CPUs per trial; default: the sweep file's."),
    gpus_per_trial: float | None = typer.Option(None, help="GPUs per trial; default: the sweep file's."),
    max_concurrent: int | None = typer.Option(
        None, help="At most this many trials at once; default: the sweep file's."
    ),
    max_failures: int | None = typer.Option(
        None, help="Retries of a failed trial from its checkpoint; default: the sweep file's."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every trial and list them; start nothing."),
) -> None:
    """Run a grid of jobs (sweeps/NAME.yaml) as Ray Tune trials; resumable, failed trials retried."""
    from tre_cli import sweep as sweep_lib

    with _one_line_errors():
        seed_list = None
        if seeds is not None:
            try:
                seed_list = [int(s) for s in seeds.split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"--seeds expects integers separated by commas, got {seeds!r}") from None
        plan = sweep_lib.plan_sweep(
            name,
            tasks,
            preset,
            sets,
            out,
            seed_list,
            cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial,
            max_concurrent=max_concurrent,
            max_failures=max_failures,
            keep_going=dry_run,
        )
        console.print(f"[bold]{plan.spec.description}[/] ({plan.spec.preset}): {len(plan.trials)} trials -> {plan.out}")
        for note in plan.spec.notes:
            console.print(note, style="yellow", markup=False)
        if dry_run:
            for planned in plan.trials:
                console.print(f"  {planned.trial.name}", markup=False)
            for problem in plan.problems:  # every trial that cannot start, then a non-zero exit
                typer.echo(f"error: {problem}", err=True)
            if plan.problems:
                typer.echo(f"{len(plan.problems)} of {len(plan.trials) + len(plan.problems)} trials cannot start",
                           err=True)
                raise typer.Exit(1)
            return
        outcome = sweep_lib.run_sweep(plan, resume=resume, address=address, storage=storage, console=console)
    summary = (f"{len(outcome.finished)} finished, {len(outcome.failed)} failed, "
               f"{len(outcome.unfinished)} unfinished in {outcome.wall_s:.0f}s")
    if outcome.interrupted or outcome.failed:
        typer.echo(f"{summary}; continue with: {sweep_lib.resume_command(name, plan)}", err=True)
        raise typer.Exit(1)
    console.print(f"[bold green]done[/] {summary}: results in {plan.out / sweep_lib.RUNS_DIR}")


# `tre data ...` (Countdown generator, examples) and `tre rm ...` (HH reward models); the heavy
# imports are inside the commands.
from tre_cli.tasks.cli import data_app, rm_app  # noqa: E402

app.add_typer(data_app, name="data")
app.add_typer(rm_app, name="rm")

# `tre testbed build`: the built-in small model; its heavy imports are inside the command.
from tre_cli.testbed.cli import testbed_app  # noqa: E402

app.add_typer(testbed_app, name="testbed")


@app.command("eval")
def eval_command(
    task: str | None = typer.Option(None, help="math, countdown or hh; default countdown."),
    model: str | None = typer.Option(
        None, help="Hub id, local directory, `testbed`, or a run directory (its last checkpoint)."
    ),
    preset: str | None = typer.Option(None, help="smoke, small or paper."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with config sections."),
    sets: list[str] = typer.Option([], "--set", help="Override a config key (repeatable), e.g. eval.limit=100."),
    out: Path | None = typer.Option(None, help="Directory for the evaluation record (must not exist or be empty)."),
    rollout: str | None = typer.Option(None, help="Rollout engine: hf or vllm."),
    device: str | None = typer.Option(None, help="cpu, cuda or auto."),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Evaluate a model or checkpoint with the paper's protocol (the Base row of Table 1)."""
    from tre_cli import trainer

    sets = [*sets, "run.verbose=true"] if verbose else sets
    with _one_line_errors():
        if model is not None and (Path(model) / "config.yaml").is_file() and (Path(model) / "checkpoints").is_dir():
            from tre_cli.tracking import open_run_dir

            latest = open_run_dir(model).latest_checkpoint()
            if latest is None:
                raise ValueError(f"run directory {model} has no checkpoint to evaluate")
            model = str(latest[1] / "policy")
        cfg = _resolve_run_config(baseline().name, task, model, preset, config, sets, out, rollout, device)
        result = trainer.evaluate_model(cfg, console=console)
    console.print(f"[bold green]done[/] {result.run_dir}: {result.eval_metric} {result.final_eval:.4f}")


if __name__ == "__main__":  # pragma: no cover
    app()
