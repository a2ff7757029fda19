"""HH: UltraFeedback prompts scored by a Bradley-Terry reward model.

The reward is the scalar output of a sequence-classification model (any hub id or local path;
`tre rm train` makes one) on the chat-templated (prompt, response) pair, truncated to 2,048
tokens, scored in batches, on the GPU when there is one. The pair is rendered exactly as TRL's
reward trainer renders a training pair, so training and scoring see the same text.

The paper trains one reward model per policy model (from the same base): option
`reward_models` maps a policy model to its reward model, `reward_model` names one for any
policy model. A run binds the task to its policy model (`bind_model`), which picks the reward
model or fails in one line, before anything is loaded (and a sweep, before Ray starts).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from tre_cli.tasks.base import Task, load_split_rows, render_user_prompt, resolve_options

DEFAULT_SOURCE = "trl-lib/ultrafeedback_binarized"
DEFAULT_OPTIONS = {
    "reward_model": None,  # hub id or local folder of a sequence-classification reward model
    "reward_models": {},  # policy model (as model.name) -> its reward model; the paper's setup
    "rm_max_length": 2048,
    "rm_batch_size": 16,
    "rm_device": None,  # None: cuda when available, else cpu
}


def prompt_of(row: Mapping[str, Any]) -> str:
    """The user prompt of a preference row: a `prompt` string, a `prompt` message list, or the
    user turn of a `chosen` conversation (trl-lib/ultrafeedback_binarized has only the latter)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    messages = prompt if isinstance(prompt, list) and prompt else row.get("chosen")
    if isinstance(messages, list):
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[-1])
    raise ValueError(f"an HH row needs a 'prompt' or a 'chosen' conversation, got keys {sorted(row)}")


def conversation(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def pair_text(tokenizer, prompt: str, response: str) -> str:
    """The text the reward model reads: the chat template over (user prompt, assistant reply)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation(prompt, response), tokenize=False)
    eos = tokenizer.eos_token or ""
    return f"User: {prompt}\nAssistant: {response}{eos}"


class RewardModelScorer:
    """Batched scalar rewards from a sequence-classification model, loaded on first use."""

    def __init__(self, model: str, max_length: int = 2048, batch_size: int = 16, device: str | None = None):
        self.model_name = str(model)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = device
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_name)
            model = AutoModelForSequenceClassification.from_pretrained(self.model_name, dtype=dtype)
        except OSError as error:
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"cannot load reward model {self.model_name!r} ({first}); pass a local folder with "
                "--set task.options.reward_model=PATH (make one with `tre rm train`)"
            ) from None
        if model.config.num_labels != 1:
            raise ValueError(f"reward model {self.model_name!r} has {model.config.num_labels} labels; a scalar RM has 1")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Sequence-classification heads read the last non-pad token, so they need the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        self._tokenizer = tokenizer
        self._model = model.to(device).eval()
        self.device = device

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")
        with self._lock:
            if self._model is None:
                self._load()
            texts = [pair_text(self._tokenizer, p, r) for p, r in zip(prompts, responses)]
            encoded = [
                self._tokenizer(t, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
                for t in texts
            ]
            # Batches of similar length waste little on padding.
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
            scores = [0.0] * len(encoded)
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                batch = self._tokenizer.pad(
                    {"input_ids": [encoded[i] for i in indices]}, padding=True, return_tensors="pt"
                ).to(self.device)
                with torch.inference_mode():
                    logits = self._model(**batch).logits[:, 0].float().cpu().tolist()
                for i, value in zip(indices, logits):
                    scores[i] = float(value)
            return scores


def _check_reward_model_options(options: Mapping[str, Any]) -> None:
    single = options["reward_model"]
    if single is not None and (not isinstance(single, str) or not single.strip()):
        raise ValueError(f"task 'hh': reward_model must be a hub id or a folder (or null), got {single!r}")
    mapping = options["reward_models"]
    if mapping is None:
        return
    if not isinstance(mapping, Mapping) or not all(
        isinstance(k, str) and (v is None or (isinstance(v, str) and v.strip())) for k, v in mapping.items()
    ):
        raise ValueError(f"task 'hh': reward_models must map policy models to reward models, got {mapping!r}")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~"))


def reward_model_for(options: Mapping[str, Any], policy_model: str) -> str:
    """The reward model for `policy_model`: its entry in `reward_models`, else `reward_model`.
    Neither, the two disagreeing, or a local path that does not exist: a ValueError in one line."""
    single = options.get("reward_model")
    mapped = (options.get("reward_models") or {}).get(policy_model)
    if single and mapped and single != mapped:
        raise ValueError(
            f"task 'hh': task.options.reward_model ({single}) and the task.options.reward_models entry for "
            f"{policy_model!r} ({mapped}) disagree; set one of them"
        )
    chosen = mapped or single
    if not chosen:
        known = ", ".join(sorted(k for k, v in (options.get("reward_models") or {}).items() if v)) or "none"
        raise ValueError(
            f"task 'hh' has no reward model for policy model {policy_model!r} (task.options.reward_models "
            f"has: {known}); map it in task.options.reward_models or --set task.options.reward_model=PATH "
            "(train one with `tre rm train`)"
        )
    if _looks_local(chosen) and not Path(chosen).expanduser().exists():
        raise ValueError(f"task 'hh': the reward model {chosen} for policy model {policy_model!r} does not exist")
    return chosen


class HHTask(Task):
    def __init__(self, **options):
        super().__init__(name="hh", options=resolve_options("hh", options, DEFAULT_OPTIONS))
        _check_reward_model_options(self.options)
        model = self.options["reward_model"]
        self._scorer = self._make_scorer(model) if model else None

    def _make_scorer(self, model: str) -> RewardModelScorer:
        return RewardModelScorer(model, self.options["rm_max_length"], self.options["rm_batch_size"], self.options["rm_device"])

    def bind_model(self, policy_model: str) -> "HHTask":
        """Score with the reward model of `policy_model` (see reward_model_for)."""
        chosen = reward_model_for(self.options, policy_model)
        if self._scorer is None or self._scorer.model_name != chosen:
            self._scorer = self._make_scorer(chosen)
        return self

    def load(self, split: str, limit: int | None = None) -> list[dict]:
        rows = load_split_rows(self.options, split, limit, DEFAULT_SOURCE)
        return [{"prompt": prompt_of(row)} for row in rows]

    def render(self, example: Mapping[str, Any], tokenizer) -> str:
        return render_user_prompt(example["prompt"], tokenizer, self.options["template"])

    def reward(self, response: str, example: Mapping[str, Any]) -> float:
        return self.rewards([response], [example])[0]

    def rewards(self, responses: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> list[float]:
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
        if self._scorer is None:
            raise ValueError(
                "task 'hh' needs a reward model: --set task.options.reward_model=PATH, or map the policy model "
                "in task.options.reward_models (train one with `tre rm train`)"
            )
        return self._scorer.score([e["prompt"] for e in examples], [str(r) for r in responses])
