"""`tre testbed ...`: build and inspect the built-in testbed model (registered by tre_cli.cli)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

testbed_app = typer.Typer(
    name="testbed",
    help="The built-in testbed model: a small Qwen2 warm-started on Countdown, built locally.",
    no_args_is_help=True,
)


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(code=2)


@testbed_app.command("build")
def build(
    force: bool = typer.Option(False, "--force", help="Rebuild even when the cache has it."),
    out: Path | None = typer.Option(
        None, "--out", help="Build into this (new or empty) directory instead of the cache."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Supervised steps (with --out only)."),
) -> None:
    """Build the testbed (a few minutes on 2 CPU cores) and print where it is and its card."""
    from tre_cli.models import testbed

    log = lambda message: typer.echo(f"  {message}", err=True)  # noqa: E731
    try:
        if out is not None:
            overrides = {} if steps is None else {"steps": steps}
            testbed.build_testbed(out, log=log, **overrides)
            path = out
        else:
            if steps is not None:
                raise ValueError("--steps changes the recipe; use it with --out DIR")
            path = testbed.ensure_testbed(log=log, force=force)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        _fail(error)
    card = json.loads((Path(path) / "testbed.json").read_text())
    typer.echo(str(path))
    typer.echo(json.dumps({k: v for k, v in card.items() if k != "spec"}, indent=2))


@testbed_app.command("path")
def path() -> None:
    """Print the testbed's cache directory (built or not)."""
    from tre_cli.models import testbed

    typer.echo(str(testbed.testbed_dir()))
