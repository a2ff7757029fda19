"""`tre testbed ...`: the built-in testbed model (registered by tre_cli.cli).

`--model testbed` always means the copy that ships with the package, the same bytes on every
machine. `tre testbed build` rebuilds it from the recipe (into the cache or --out) and compares
the result with the shipped one; `tre testbed ship DIR` makes a build the shipped copy (after a
recipe change, for the developers).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

testbed_app = typer.Typer(
    name="testbed",
    help="The built-in testbed model: a small Qwen2 warm-started on Countdown, shipped with tre.",
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
    """Rebuild the testbed from its recipe (a few minutes on 2 CPU cores) and compare it with the shipped one."""
    from tre_cli.models import testbed
    from tre_cli.testbed.build import build_testbed, ensure_testbed

    log = lambda message: typer.echo(f"  {message}", err=True)  # noqa: E731
    try:
        if out is not None:
            overrides = {} if steps is None else {"steps": steps}
            build_testbed(out, log=log, **overrides)
            path = out
        else:
            if steps is not None:
                raise ValueError("--steps changes the recipe; use it with --out DIR")
            path = ensure_testbed(log=log, force=force)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        _fail(error)
    card = json.loads((Path(path) / "testbed.json").read_text())
    typer.echo(str(path))
    typer.echo(json.dumps({k: v for k, v in card.items() if k != "spec"}, indent=2))
    if card.get("spec_hash") == testbed.spec_hash(testbed.TESTBED_SPEC):
        typer.echo("compared with the shipped testbed (what --model testbed uses):")
        for what, rebuilt, shipped in testbed.compare_with_shipped(card, Path(path)):
            typer.echo(f"  {what:<24} rebuilt {rebuilt!s:<22} shipped {shipped}")


@testbed_app.command("path")
def path() -> None:
    """Print the shipped testbed's directory (what --model testbed uses)."""
    from tre_cli.models import testbed

    try:
        typer.echo(str(testbed.shipped_testbed()))
    except ValueError as error:
        _fail(error)


@testbed_app.command("ship", hidden=True)
def ship(source: Path = typer.Argument(..., help="A testbed built from today's recipe.")) -> None:
    """Make the build in SOURCE the shipped testbed (developers, after changing the recipe)."""
    from tre_cli.models import testbed

    try:
        typer.echo(str(testbed.ship(source)))
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
