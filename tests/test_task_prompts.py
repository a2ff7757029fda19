"""Prompts longer than ppo.max_prompt_length: dropped from both splits when the task is loaded
(the released scripts' filter_overlong_prompts), cut from the left only on request."""

from __future__ import annotations

import json
import logging

import pytest

from tre_cli.tasks import get_task
from tre_cli.tasks.base import fit_prompts, prompt_lengths


class WordTokenizer:
    """One token per whitespace-separated word: lengths are easy to read in a test."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        texts = [text] if isinstance(text, str) else text
        ids = [[len(word) for word in t.split()] for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def examples(*counts):
    """Countdown examples whose raw prompts grow with the number of numbers."""
    return [{"nums": list(range(1, count + 1)), "target": 10} for count in counts]


def raw_task(**options):
    return get_task("countdown", template="raw", **options)


def test_prompt_lengths_are_the_trainers_encoding(quick_testbed):
    from tre_cli.models import load_tokenizer
    from tre_cli.trainer import encode_prompt

    tokenizer = load_tokenizer(quick_testbed)
    task = get_task("countdown")
    rows = examples(2, 4, 9)
    assert prompt_lengths(task, rows, tokenizer) == [len(encode_prompt(task, r, tokenizer, 10**6)) for r in rows]


def test_overlong_prompts_are_dropped_from_every_split_and_logged_once(caplog):
    task, tokenizer = raw_task(), WordTokenizer()
    lengths = prompt_lengths(task, examples(2, 3, 12, 30), tokenizer)
    assert lengths[0] < lengths[1] < lengths[2] < lengths[3]
    limit = lengths[1]
    with caplog.at_level(logging.WARNING, logger="tre"):
        kept = fit_prompts(task, tokenizer, limit, {"train": examples(2, 3, 12, 30), "test": examples(30, 2)})
    assert kept == {"train": examples(2, 3), "test": examples(2)}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "dropped 2 of 4 train and 1 of 2 test prompts longer than ppo.max_prompt_length" in lines[0]


def test_nothing_dropped_means_nothing_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="tre"):
        kept = fit_prompts(raw_task(), WordTokenizer(), 10**6, {"train": examples(2, 3)})
    assert kept == {"train": examples(2, 3)} and not caplog.records


def test_truncation_only_on_request(caplog):
    task, tokenizer = raw_task(overlong_prompts="truncate_left"), WordTokenizer()
    limit = prompt_lengths(task, examples(2), tokenizer)[0]
    with caplog.at_level(logging.WARNING, logger="tre"):
        kept = fit_prompts(task, tokenizer, limit, {"train": examples(2, 30)})
    assert kept == {"train": examples(2, 30)}
    assert "cut from the left 1 of 2 train prompts" in caplog.records[0].getMessage()


def test_error_mode_and_an_emptied_split_are_one_line():
    tokenizer = WordTokenizer()
    limit = prompt_lengths(raw_task(), examples(2), tokenizer)[0]
    with pytest.raises(ValueError, match=r"1 of 2 train prompts are longer than ppo.max_prompt_length=\d+ tokens"):
        fit_prompts(raw_task(overlong_prompts="error"), tokenizer, limit, {"train": examples(2, 30)})
    with pytest.raises(ValueError, match="all 1 test prompts are longer"):
        fit_prompts(raw_task(), tokenizer, limit, {"train": examples(2), "test": examples(30)})
    with pytest.raises(ValueError, match="overlong_prompts must be one of drop, truncate_left, error"):
        raw_task(overlong_prompts="truncate")


def test_the_trainer_drops_overlong_prompts_when_it_loads_the_task(quick_testbed, tmp_path):
    from tre_cli import trainer
    from tre_cli.config import resolve
    from tre_cli.models import load_tokenizer

    data = tmp_path / "cd.jsonl"
    rows = [{"nums": list(range(1, 3 + i % 5)), "target": 10 + i} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(quick_testbed)
    task = get_task("countdown")
    lengths = prompt_lengths(task, [{"nums": r["nums"], "target": r["target"]} for r in rows], tokenizer)
    limit = sorted(lengths)[len(lengths) // 2]
    fits = sum(n <= limit for n in lengths)
    assert 0 < fits < len(rows)
    config = resolve(task="countdown", model=str(quick_testbed), preset="smoke", check_device=False, overrides=[
        f"task.options.train_source={data}", f"task.options.test_source={data}", f"ppo.max_prompt_length={limit}",
        "eval.limit=null", f"run.out={tmp_path / 'run'}", "run.wandb.mode=disabled"])
    parts = trainer.build(config)
    assert len(parts.train) == len(parts.test) == fits
    assert all(len(ids) <= limit for ids in parts.test_prompts)
    assert [len(ids) for ids in parts.test_prompts] == [n for n in lengths if n <= limit]  # nothing was cut
    parts.engine.close()
