"""Every error hint that names a config key (`--set KEY=VALUE`) names one the config accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tre_cli.config import SECTIONS, resolve
from tre_cli.tasks import TASKS, get_task

SOURCE = Path(__file__).resolve().parents[1] / "tre_cli"
HINT = re.compile(r"--set ([a-z_]+(?:\.[a-z_{}]+)+)=([A-Za-z0-9_.-]+)")


def _hints() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        for key, value in HINT.findall(path.read_text()):
            if key.split(".")[0] in SECTIONS:  # not a placeholder such as `--set a.b=c`
                found.append((path.name, key.replace("{split}", "train"), value))
    return found


def test_the_scan_finds_the_hints():
    keys = {key for _, key, _ in _hints()}
    assert {"task.options.reward_model", "task.options.train_source", "task.options.template",
            "rollout.engine"} <= keys


@pytest.mark.parametrize("where, key, value", _hints())
def test_each_hinted_key_is_accepted(where, key, value, tmp_path):
    sample = {"PATH": str(tmp_path / "x.jsonl")}.get(value, value)
    method = "tre-k" if key == "method.k" else None
    config = resolve(task="hh" if "reward_model" in key else "countdown", method=method, overrides=[f"{key}={sample}"])
    if key.startswith("task.options."):
        option = key.split(".", 2)[2]
        # The option must also be one a task itself knows (the config keeps task options free-form).
        accepted = []
        for task in TASKS:
            try:
                get_task(task, **{option: config.task.options[option]})
            except ValueError as error:
                if "unknown option" in str(error):
                    continue
            accepted.append(task)
        assert accepted, (where, key)
