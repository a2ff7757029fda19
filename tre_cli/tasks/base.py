"""What every task shares: option checking, loading rows from a hub or a local file, chat prompts.

A task is built from a flat dict of options (the `task:` block of the run config). Options that a
task does not know are an error naming the option, so a typo in a YAML never passes silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

SPLITS = ("train", "test")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# What to do with a prompt longer than ppo.max_prompt_length tokens: drop it from its split when
# the task is loaded (the released scripts' filter_overlong_prompts), keep its last tokens, or
# refuse to run.
OVERLONG_PROMPTS = ("drop", "truncate_left", "error")

log = logging.getLogger("tre")

# Options every task accepts; each task adds its own on top. `None` means "not set".
COMMON_OPTIONS: dict[str, Any] = {
    "train_source": None,  # hub id, local .jsonl/.json/.parquet file, or a folder with <split>.jsonl
    "test_source": None,
    "train_split": "train",  # split name inside a hub dataset
    "test_split": "test",
    "train_offset": 0,  # first row taken from a hub split or a generated stream (after shuffling)
    "test_offset": 0,
    "train_size": None,  # at most this many rows (None: all)
    "test_size": None,
    "shuffle_seed": None,  # shuffle a hub split with this seed before taking rows
    "template": "chat",  # chat: the tokenizer's chat template; raw: plain "User: ...\nAssistant:"
    "overlong_prompts": "drop",  # a prompt over ppo.max_prompt_length tokens: drop | truncate_left | error
}


def resolve_options(task_name: str, given: Mapping[str, Any], extra_defaults: Mapping[str, Any]) -> dict:
    """Merge defaults with the given options; unknown names are a ValueError naming them."""
    defaults = {**COMMON_OPTIONS, **extra_defaults}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"task {task_name!r}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(defaults))}"
        )
    options = {**defaults, **given}
    if options["template"] not in ("chat", "raw"):
        raise ValueError(f"task {task_name!r}: template must be 'chat' or 'raw', got {options['template']!r}")
    if options["overlong_prompts"] not in OVERLONG_PROMPTS:
        raise ValueError(
            f"task {task_name!r}: overlong_prompts must be one of {', '.join(OVERLONG_PROMPTS)}, "
            f"got {options['overlong_prompts']!r}"
        )
    for split in SPLITS:
        for key in (f"{split}_offset", f"{split}_size"):
            value = options[key]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"task {task_name!r}: {key} must be a non-negative integer, got {value!r}")
    return options


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def is_local_source(source: str) -> bool:
    text = str(source)
    return (
        text.endswith(LOCAL_SUFFIXES)
        or text.startswith(("/", "./", "../", "~"))
        or Path(text).expanduser().exists()
    )


def read_local_rows(source: str | Path, split: str) -> list[dict]:
    """Rows of a local JSONL/JSON/Parquet file, or of <folder>/<split>.{jsonl,parquet}."""
    path = Path(source).expanduser()
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES]
        found = [p for p in candidates if p.exists()]
        if not found:
            raise FileNotFoundError(f"folder {path} has no {split}.jsonl, {split}.json or {split}.parquet")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"reading {path} needs pyarrow: pip install 'tre-cli[data]'") from None
        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json data file must hold a list of objects")
        return rows
    rows = []
    with path.open() as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
    return rows


def read_hub_rows(hub_id: str, hub_split: str, split: str, start: int, stop: int | None, shuffle_seed) -> list[dict]:
    """Rows [start, stop) of a hub split, shuffled first when a seed is given."""
    hint = f"pass a local file with --set task.options.{split}_source=PATH (.jsonl or .parquet)"
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"loading hub dataset {hub_id!r} needs the `datasets` package (pip install 'tre-cli[data]'); "
            f"or {hint}"
        ) from None
    try:
        dataset = datasets.load_dataset(hub_id, split=hub_split)
    except Exception as error:  # network, auth, missing split: all end the same way for the user
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load hub dataset {hub_id!r} split {hub_split!r} ({reason}); {hint}") from None
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    stop = len(dataset) if stop is None else min(stop, len(dataset))
    if start >= stop:
        return []
    return dataset.select(range(start, stop)).to_list()


def load_split_rows(
    options: Mapping[str, Any],
    split: str,
    limit: int | None,
    default_source: str | None,
    generator: Callable[[int], list[dict]] | None = None,
) -> list[dict]:
    """Raw rows of one split, following the task options (source, split, offset, size, shuffle).

    Offsets and shuffling select rows of a hub split or of a generated stream; a local file is
    already the split, so it is read from its first row.
    """
    check_split(split)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    size = options[f"{split}_size"]
    count = min(x for x in (size, limit) if x is not None) if (size is not None or limit is not None) else None
    source = options[f"{split}_source"] or default_source
    offset = options[f"{split}_offset"] or 0
    if source is None:
        if generator is None:
            raise ValueError(f"no {split}_source given; pass --set task.options.{split}_source=PATH")
        total = offset + (count if count is not None else 0)
        return generator(total)[offset:]
    if is_local_source(source):
        rows = read_local_rows(source, split)
        return rows if count is None else rows[:count]
    stop = None if count is None else offset + count
    return read_hub_rows(str(source), options[f"{split}_split"], split, offset, stop, options["shuffle_seed"])


def render_user_prompt(user_text: str, tokenizer, template: str) -> str:
    """The prompt string for one user turn: the tokenizer's chat template, or the raw form."""
    if template == "raw":
        return f"User: {user_text}\nAssistant:"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use --set task.options.template=raw for a base model")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )


def prompt_lengths(task: "Task", examples: Sequence[Mapping[str, Any]], tokenizer) -> list[int]:
    """Tokens in each example's rendered prompt, encoded as the trainer encodes it."""
    if not examples:
        return []
    texts = [task.render(example, tokenizer) for example in examples]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def fit_prompts(task: "Task", tokenizer, max_length: int, splits: Mapping[str, list]) -> dict[str, list]:
    """Each split without the examples whose prompt is longer than `max_length` tokens (option
    `overlong_prompts: drop`, the released scripts' filter_overlong_prompts), or unchanged
    (`truncate_left`: the trainer keeps the last `max_length` tokens), or an error naming the
    count (`error`). One log line says what was dropped or cut; a split left empty is an error."""
    mode = task.options.get("overlong_prompts", "drop")
    kept: dict[str, list] = {}
    counts: list[str] = []
    for split, examples in splits.items():
        lengths = prompt_lengths(task, examples, tokenizer)
        over = sum(length > max_length for length in lengths)
        if over and mode == "error":
            raise ValueError(
                f"task {task.name!r}: {over} of {len(examples)} {split} prompts are longer than "
                f"ppo.max_prompt_length={max_length} tokens (the longest has {max(lengths)}); raise "
                "ppo.max_prompt_length, or set task.options.overlong_prompts=drop or truncate_left"
            )
        kept[split] = examples if mode != "drop" else [e for e, n in zip(examples, lengths) if n <= max_length]
        if examples and not kept[split]:
            raise ValueError(
                f"task {task.name!r}: all {len(examples)} {split} prompts are longer than "
                f"ppo.max_prompt_length={max_length} tokens; raise it or set task.options.overlong_prompts=truncate_left"
            )
        if over:
            counts.append(f"{over:,} of {len(examples):,} {split}")
    if counts:
        action = "dropped" if mode == "drop" else "cut from the left"
        log.warning(
            "task %r: %s %s prompts longer than ppo.max_prompt_length=%d tokens (task.options.overlong_prompts=%s)",
            task.name, action, " and ".join(counts), max_length, mode,
        )
    return kept


@dataclass
class Task:
    """Base of every task: options, data loading and the batched reward on top of `reward`."""

    name: str = ""
    options: dict = field(default_factory=dict)

    def load(self, split: str, limit: int | None = None) -> list[dict]:
        raise NotImplementedError

    def render(self, example: Mapping[str, Any], tokenizer) -> str:
        raise NotImplementedError

    def reward(self, response: str, example: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def bind_model(self, policy_model: str) -> "Task":
        """The task as a run of `policy_model` uses it (HH picks that model's reward model);
        a task that does not depend on the policy model returns itself."""
        return self

    def rewards(self, responses: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> list[float]:
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
        return [self.reward(response, example) for response, example in zip(responses, examples)]
