"""`tre data ...` and `tre rm ...`: task data and reward models. Heavy imports stay inside the
commands so that `tre --help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import typer

data_app = typer.Typer(help="Task data: generate Countdown instances, show task examples.", no_args_is_help=True)
rm_app = typer.Typer(help="Reward models for the HH task.", no_args_is_help=True)


@rm_app.callback()
def rm_group() -> None:
    """Reward models for the HH task."""  # a callback keeps `rm` a group with a single command


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@data_app.command("countdown")
def data_countdown(
    n: int = typer.Option(..., "--n", min=1, help="Number of instances."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same rows."),
    out: Path = typer.Option(..., "--out", help="Output JSONL file (nums, target, solution)."),
    split: str | None = typer.Option(
        None, "--split", help="train or test: draw from that side of the fixed train/test partition."
    ),
) -> None:
    """Write N solvable Countdown instances (3-4 numbers in 1..99, target 10..100, a solution)."""
    from tre_cli.tasks.countdown import generate

    if split not in (None, "train", "test"):
        _fail(f"--split must be train or test, got {split!r}")
    if out.exists():
        _fail(f"{out} exists; choose a new file")
    from tre_cli.io import atomic_write_text

    rows = generate(n, seed, split)
    # Written whole or not at all: an interrupted run leaves nothing half-written.
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    typer.echo(f"wrote {len(rows)} instances to {out}")


@data_app.command("show")
def data_show(
    task: str = typer.Argument(..., help="math, countdown or hh."),
    split: str = typer.Option("test", "--split"),
    n: int = typer.Option(3, "--n", min=1),
    source: str | None = typer.Option(None, "--source", help="Hub id or local file for this split."),
) -> None:
    """Print a few examples of a task as loaded (with its default options)."""
    from tre_cli.tasks import get_task, task_overlay

    try:
        options = dict(task_overlay(task).get("task", {}))
        if source:
            options[f"{split}_source"] = source
        rows = get_task(task, **options).load(split, limit=n)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    for row in rows:
        typer.echo(json.dumps(row, ensure_ascii=False))


@rm_app.command("train")
def rm_train(
    model: str = typer.Option(..., "--model", help="Base model: hub id or local folder."),
    out: Path = typer.Option(..., "--out", help="Folder for the trained reward model (must be new or empty)."),
    data: str = typer.Option(
        "trl-lib/ultrafeedback_binarized", "--data", help="Preference pairs: hub id, .jsonl/.parquet, or a folder."
    ),
    epochs: float = typer.Option(3.0, "--epochs"),
    lr: float = typer.Option(1e-5, "--lr"),
    warmup_ratio: float = typer.Option(0.1, "--warmup-ratio"),
    center_rewards: float = typer.Option(0.01, "--center-rewards", help="Centre-rewards coefficient."),
    batch_size: int = typer.Option(512, "--batch-size", help="Global batch size (pairs)."),
    per_device_batch_size: int = typer.Option(8, "--per-device-batch-size"),
    max_length: int = typer.Option(2048, "--max-length", help="Pairs longer than this many tokens are skipped."),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N pairs."),
    seed: int = typer.Option(42, "--seed"),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
) -> None:
    """Train a Bradley-Terry reward model (TRL RewardTrainer) with the paper's defaults."""
    from tre_cli.tasks.rm_train import RewardTrainingConfig, train_reward_model

    try:
        config = RewardTrainingConfig(
            epochs=epochs,
            learning_rate=lr,
            warmup_ratio=warmup_ratio,
            center_rewards_coefficient=center_rewards,
            batch_size=batch_size,
            per_device_batch_size=per_device_batch_size,
            max_length=max_length,
            seed=seed,
            limit=limit,
            gradient_checkpointing=gradient_checkpointing,
        )
        summary = train_reward_model(model, data, out, config)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    metrics = summary["metrics"]
    typer.echo(
        f"trained on {summary['pairs']} pairs; train loss {metrics.get('train_loss', float('nan')):.4f}, "
        f"last accuracy {metrics.get('final_accuracy', float('nan')):.3f}; saved to {out}"
    )
