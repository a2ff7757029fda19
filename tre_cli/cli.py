"""The `tre` command line: parse, validate, dispatch. No training logic lives here."""

from __future__ import annotations

from typing import Optional

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


if __name__ == "__main__":  # pragma: no cover
    app()
