"""The built-in `testbed` model's recipe (TESTBED_SPEC, whose hash names a build) and the copy
shipped with the package, which `--model testbed` loads (models.resolve_model): its checksums,
their check, and the developer's step that ships a new build. tre_cli/testbed/ builds it (the
recipe, step by step, is described there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

TESTBED_VERSION = 1
# The held-out problems (and sampling seed) of the card's reward and slip rate; far from the SFT seeds.
SLIP_EVAL_SEED = 987_654_321

TESTBED_SPEC: dict[str, Any] = {
    "version": TESTBED_VERSION,
    "seed": 1,
    "vocab_size": 384,  # BPE target; the embedding is padded to a multiple of 64
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,  # head_dim 32
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
    "sft_problems": 6000,
    # Copying the prompt's numbers appears suddenly (an induction-head phase change) after about
    # 150-250 steps; the rest of the budget makes the copies reliable at temperature 1.0.
    "steps": 600,
    "batch_size": 32,
    "lr": 5e-3,
    "warmup_steps": 50,
    "eval_problems": 512,
    # What goes between <think> and </think>: "steps" (the running totals) or "equation" (the
    # answer's expression = target, a much shorter thing to learn).
    "think": "equation",
    # The fraction of warm-start answers written "<answer>EXPR = target</answer>", a slip the
    # scorer gives 0 (tre_cli/testbed/__init__.py says why).
    "slips": 0.5,
}


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


# The testbed as built once from TESTBED_SPEC and shipped with the package, so that every machine
# trains, tests and demos the same bytes (a rebuild on another processor is a different model:
# its kernels sum in another order and 600 SFT steps at lr 5e-3 amplify that).
SHIPPED_DIR = Path(__file__).resolve().parent / "testbed_weights"
CHECKSUMS = "SHA256SUMS"
_verified: set[Path] = set()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """SHA256SUMS over every other file of `folder` (sha256sum's format)."""
    lines = [f"{file_sha256(path)}  {path.name}" for path in sorted(folder.iterdir()) if path.name != CHECKSUMS]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")


def verify_testbed(folder: str | os.PathLike) -> dict:
    """The card of the testbed in `folder` after checking it: every file matches SHA256SUMS and the
    card's recipe hash is today's TESTBED_SPEC. A ValueError names what is wrong."""
    folder = Path(folder)
    sums = folder / CHECKSUMS
    if not sums.is_file():
        raise ValueError(f"testbed at {folder} has no {CHECKSUMS}; reinstall tre-cli")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise ValueError(f"testbed file {path} is missing or altered (checksum mismatch); reinstall tre-cli")
    card = json.loads((folder / "testbed.json").read_text())
    if card.get("spec_hash") != spec_hash(TESTBED_SPEC):
        raise ValueError(
            f"the testbed at {folder} was built from recipe {card.get('spec_hash')}, but TESTBED_SPEC is "
            f"{spec_hash(TESTBED_SPEC)}: rebuild and ship it (tre testbed build --out DIR, then tre testbed ship DIR)"
        )
    return card


def shipped_testbed() -> Path:
    """The shipped testbed's folder, verified once per process."""
    if SHIPPED_DIR not in _verified:
        verify_testbed(SHIPPED_DIR)
        _verified.add(SHIPPED_DIR)
    return SHIPPED_DIR


def compare_with_shipped(card: dict, folder: Path) -> list[tuple[str, Any, Any]]:
    """(what, rebuilt, shipped) rows comparing a fresh build with the shipped testbed."""
    shipped = json.loads((SHIPPED_DIR / "testbed.json").read_text())
    rows = [
        (key, card.get(key), shipped.get(key))
        for key in ("final_loss", "countdown_reward_t1", "answer_slip_rate_t1", "build_seconds")
    ]
    weights = "model.safetensors"
    same = file_sha256(folder / weights) == file_sha256(SHIPPED_DIR / weights)
    rows.append(("weights bitwise equal", same, True))
    return rows


def ship(source: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Make the build in `source` the shipped testbed (`target`, default SHIPPED_DIR): a developer's
    step after changing the recipe. Copies, writes SHA256SUMS, verifies, then swaps in."""
    source, target = Path(source), Path(target or SHIPPED_DIR)
    card = json.loads((source / "testbed.json").read_text())
    if card.get("spec_hash") != spec_hash(TESTBED_SPEC):
        raise ValueError(f"{source} was not built from today's TESTBED_SPEC")
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    (staging / CHECKSUMS).unlink(missing_ok=True)
    write_checksums(staging)
    verify_testbed(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    _verified.discard(target)
    return target
