"""The YAML that ships with tre: task overlays (`tasks/`) and sweep files (`sweeps/`).

The repository's top-level tasks/ and sweeps/ folders are the source of truth. A wheel carries a
copy of each under `tre_cli/_data/` (setup.py's build step copies them in); a source checkout
(an editable install, or the checkout on PYTHONPATH) reads the folders themselves, so an edit to
tasks/countdown.yaml takes effect without reinstalling.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

KINDS = ("tasks", "sweeps")
PACKAGED = "_data"


def _checkout_root() -> Path | None:
    """The source checkout holding this package, or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def data_dir(kind: str) -> Path:
    """The folder of `kind` ("tasks" or "sweeps"): the checkout's own, else the wheel's copy."""
    if kind not in KINDS:
        raise ValueError(f"unknown data folder {kind!r}; known: {', '.join(KINDS)}")
    root = _checkout_root()
    if root is not None and (root / kind).is_dir():
        return root / kind
    packaged = Path(str(resources.files("tre_cli").joinpath(PACKAGED, kind)))
    if packaged.is_dir():
        return packaged
    raise FileNotFoundError(
        f"tre's {kind}/ folder is missing (looked in {packaged}); reinstall tre-cli from a wheel or a checkout"
    )
