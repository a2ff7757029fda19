"""The `tre` command line: parse, validate, dispatch. No training logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tre_cli import __version__

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
    version: Optional[bool] = typer.Option(
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


@app.command()
def report(
    runs: Optional[List[Path]] = typer.Argument(None, help="Run directories and/or directories of runs or results stores (results.jsonl)."),
    out: Path = typer.Option(Path("report"), "--out", help="Where the tables and figures go."),
    wandb_project: Optional[str] = typer.Option(None, "--wandb", help="Read the runs of this W&B project (ENTITY/PROJECT)."),
    score: str = typer.Option("final", "--score", help="final: the last eval score; best: the best one."),
    log_wandb: Optional[bool] = typer.Option(
        None, "--log-wandb/--no-log-wandb",
        help="Log the tables and figures to W&B; default: when --wandb is given or the runs logged online.",
    ),
) -> None:
    """Table 1 (terminal, Markdown, CSV, LaTeX) and Figures 1, 3, 4 (PNG, SVG) from finished runs."""
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
        console.print(f"[yellow]{line}[/]")
    console.print(f"[bold green]wrote[/] {len(written.written)} files to {out}: " + ", ".join(p.name for p in written.written))
    if target is not None:
        entity, project, mode = target
        tables, images = report_lib.wandb_payload(written)
        run_id = tracking.log_report_to_wandb(project, entity, mode, out, tables, images)
        if run_id:
            console.print(f"logged the report to W&B ({mode}): {entity + '/' if entity else ''}{project}, run {run_id}")


if __name__ == "__main__":  # pragma: no cover
    app()
