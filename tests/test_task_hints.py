"""Hints that work: every config key that a message of tre_cli names (an error's `--set KEY=...`,
a help text's example, a log line) is one the config accepts, with the value shown where the
message shows one. Keys are found in every string literal of the package (docstrings aside)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import tre_cli
from tre_cli.config import resolve, to_dict
from tre_cli.losses.registry import METHODS
from tre_cli.tasks import TASKS, get_task

SECTIONS = ("run", "model", "task", "method", "ppo", "rollout", "eval")
# A dotted name that starts with a section, optionally followed by =VALUE.
MENTION = re.compile(r"(?<![\w.\-/{])((?:%s)\.[a-z_{][\w{}]*(?:\.[a-z_{][\w{}]*)*)(?:=([^\s,;)'\"]*))?" % "|".join(SECTIONS))
# Strings that look like keys and are not: a file name, a rich progress-bar field.
NOT_KEYS = {"eval.jsonl", "task.fields", "model.safetensors"}  # file names, not keys
PACKAGE = Path(tre_cli.__file__).parent


def _text(node) -> str | None:
    """A literal's text; an f-string's with {name} for a plain name, and a character no key
    holds for any other expression (so `{run.get('path')}` is not read as a key)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value.value, ast.Name):
                parts.append("{" + value.value.id + "}")
            else:
                parts.append("\x00")
        return "".join(parts)
    return None


def _docstrings(tree) -> set:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def mentions() -> list[tuple[str, str, str | None]]:
    """(where, key, value or None) for every key mention in the package's string literals."""
    out = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if id(node) in docstrings or (isinstance(node, ast.Constant) and _inside_fstring(node, tree)):
                continue
            text = _text(node)
            for match in MENTION.finditer(text or ""):
                key, value = match.group(1).rstrip("."), (match.group(2) or "").rstrip(".") or None
                if key in NOT_KEYS:
                    continue
                for split in ("train", "test") if "{split}" in key else (None,):
                    expanded = key.replace("{split}", split) if split else key
                    if "{" in expanded:
                        continue  # a key the code builds from a real one (f"ppo.{name}"): not a hint
                    out.add((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", expanded, value))
    return sorted(out, key=lambda m: (m[0], m[1], m[2] or ""))


_FSTRING_PARTS: dict = {}


def _inside_fstring(node, tree) -> bool:
    parts = _FSTRING_PARTS.get(id(tree))
    if parts is None:
        parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        _FSTRING_PARTS[id(tree)] = parts
    return id(node) in parts


def _placeholder(value: str | None) -> bool:
    return not value or value.isupper() or any(c in value for c in "{}%\x00")


def _lookup(data: dict, key: str):
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _task_option_accepted(option: str, value: str | None) -> bool:
    """Some task accepts `option` (with `value`, when the hint shows a concrete one)."""
    for task in TASKS:
        defaults = get_task(task).options
        if option not in defaults:
            continue
        if _placeholder(value):
            default = defaults[option]
            text = json.dumps(default if default is not None else "org/x.jsonl")
        else:
            text = value
        config = resolve(task=task, overrides=[f"task.options.{option}={text}"], check_device=False)
        get_task(task, **config.task.options)  # the task's own check of the option and value
        return True
    return False


def _config_key_accepted(key: str, value: str | None) -> None:
    """The config has `key` (for some method, if it is a method parameter) and takes `value`."""
    for method in METHODS if key.startswith("method.") else (None,):
        try:
            default = _lookup(to_dict(resolve(method=method, check_device=False)), key)
        except KeyError:
            continue
        text = json.dumps(default) if _placeholder(value) else value
        resolve(method=method, overrides=[f"{key}={text}"], check_device=False)
        return
    raise AssertionError(f"{key} is not a config key")


MENTIONS = mentions()


def test_the_scan_finds_the_hints():
    keys = {key for _, key, _ in MENTIONS}
    # The hints issue 10 found wrong, now right, and a few others the scan must see.
    for key in ("task.options.train_source", "task.options.test_source", "task.options.template",
                "task.options.reward_model", "task.options.reward_models", "rollout.engine", "ppo.loss_agg"):
        assert key in keys, key
    assert not any(key in ("task.reward_model", "task.template", "task.train_source") for key in keys)


@pytest.mark.parametrize("where, key, value", MENTIONS, ids=[f"{w} {k}" for w, k, _ in MENTIONS])
def test_every_key_a_message_names_is_accepted(where, key, value):
    if key == "task.options":
        return  # the mapping itself (messages say "task.options.NAME")
    if key.startswith("task.options."):
        option = key[len("task.options."):].split(".")[0]
        assert _task_option_accepted(option, value), f"{where}: no task has option {option!r}"
    else:
        _config_key_accepted(key, value)
