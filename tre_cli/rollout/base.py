"""What every rollout engine returns: token ids, masks and behaviour log-probs, one row per sample.

Layout: prompts left-padded, responses right-padded, so `input_ids` (prompt then response) has
every response starting at the same column. Samples are grouped by prompt: rows
[i * n, (i + 1) * n) come from prompt i. Positions count real tokens only (pads do not advance
them), as vLLM sees an unpadded prompt; `position_ids` gives the trainer the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P] long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [N, P] long, 1 on prompt tokens
    response_ids: torch.Tensor  # [N, R] long, right-padded with pad_token_id
    response_mask: torch.Tensor  # [N, R] long, 1 on sampled tokens (the EOS token included)
    logprobs: torch.Tensor  # [N, R] float32: log softmax(logits / temperature) of each sampled token; 0 on padding
    prompt_index: torch.Tensor  # [N] long: the prompt each sample answers
    finished: torch.Tensor  # [N] bool: ended with EOS or a stop string (False: cut at max_new_tokens)
    texts: list[str]  # decoded responses, special tokens (EOS) skipped
    pad_token_id: int
    temperature: float

    @property
    def num_samples(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens; pads before the first real token get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs_from_logits(
    logits: torch.Tensor, response_ids: torch.Tensor, prompt_width: int, temperature: float
) -> torch.Tensor:
    """Log-probs [N, R] of the response tokens under softmax(logits / temperature) (float32).

    `logits` are of a full forward over `Rollout.input_ids`; this is the recomputation every
    engine's behaviour log-probs must agree with.
    """
    response_width = response_ids.shape[1]
    predicting = logits[:, prompt_width - 1 : prompt_width - 1 + response_width].float() / temperature
    return torch.log_softmax(predicting, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)


def check_generate_args(
    prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty (no token ids)")
    if n < 1:
        raise ValueError(f"samples per prompt must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask, left-padded to `width` (None: the longest sequence's)."""
    longest = max(len(s) for s in sequences)
    width = longest if width is None else int(width)
    if width < longest:
        raise ValueError(f"left_pad: width {width} is shorter than a {longest}-token sequence")
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, width - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids, mask


def assemble_rollout(
    prompts: Sequence[Sequence[int]],
    n: int,
    responses: Sequence[Sequence[int]],
    response_logprobs: Sequence[Sequence[float]],
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    tokenizer: Any,
    temperature: float,
) -> Rollout:
    """A Rollout from per-sample token lists (sample k answers prompt k // n)."""
    if len(responses) != len(prompts) * n or len(response_logprobs) != len(responses):
        raise ValueError(f"expected {len(prompts) * n} responses, got {len(responses)}")
    prompt_ids, prompt_mask = left_pad([prompts[k // n] for k in range(len(responses))], pad_token_id)
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    logprobs = torch.zeros((len(responses), width), dtype=torch.float32)
    eos = set(int(e) for e in eos_token_ids)
    finished = torch.zeros(len(responses), dtype=torch.bool)
    for row, (tokens, token_logprobs) in enumerate(zip(responses, response_logprobs)):
        if len(tokens) != len(token_logprobs):
            raise ValueError(f"sample {row}: {len(tokens)} tokens but {len(token_logprobs)} log-probs")
        if tokens:
            response_ids[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
            response_mask[row, : len(tokens)] = 1
            logprobs[row, : len(tokens)] = torch.as_tensor(list(token_logprobs), dtype=torch.float32)
            finished[row] = int(tokens[-1]) in eos
    texts = tokenizer.batch_decode([list(r) for r in responses], skip_special_tokens=True)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=logprobs,
        prompt_index=torch.arange(len(responses), dtype=torch.long) // n,
        finished=finished,
        texts=texts,
        pad_token_id=int(pad_token_id),
        temperature=float(temperature),
    )


def stop_length(tokens: Sequence[int], stop: Sequence[str], tokenizer: Any) -> int | None:
    """How many of `tokens` a response keeps when it ends at the first of the `stop` strings: up
    to and including the token that completes the first occurrence in the decoded text (special
    tokens skipped, as Rollout.texts); None when no stop string occurs."""
    def decoded(k: int) -> str:
        return tokenizer.decode(list(tokens[:k]), skip_special_tokens=True)

    def stops(k: int) -> bool:
        text = decoded(k)
        return any(s in text for s in stop)

    if not stop or not tokens or not stops(len(tokens)):
        return None
    low, high = 1, len(tokens)  # the shortest prefix that holds a stop string (containment only grows)
    while low < high:
        middle = (low + high) // 2
        if stops(middle):
            high = middle
        else:
            low = middle + 1
    return low


def cut_at_stop(rollout: Rollout, stop: Sequence[str], tokenizer: Any) -> Rollout:
    """The rollout with every response ended at its first stop string (`rollout.stop`), as if
    sampling had stopped there: the kept tokens, their log-probs and masks are unchanged (a token
    depends only on those before it), the rest becomes padding, the response counts as finished
    and its text is re-decoded. No stop strings: the rollout itself."""
    if not stop:
        return rollout
    ids, mask, logprobs = rollout.response_ids.clone(), rollout.response_mask.clone(), rollout.logprobs.clone()
    finished, texts = rollout.finished.clone(), list(rollout.texts)
    for row in range(rollout.num_samples):
        if not any(s in texts[row] for s in stop):  # the whole response's text, decoded once already
            continue
        length = int(mask[row].sum())
        keep = stop_length(ids[row, :length].tolist(), stop, tokenizer)
        if keep is None:
            continue
        ids[row, keep:] = rollout.pad_token_id
        mask[row, keep:] = 0
        logprobs[row, keep:] = 0.0
        finished[row] = True
        texts[row] = tokenizer.decode(ids[row, :keep].tolist(), skip_special_tokens=True)
    width = max(1, int(mask.sum(-1).max()))
    return replace(rollout, response_ids=ids[:, :width], response_mask=mask[:, :width],
                   logprobs=logprobs[:, :width], finished=finished, texts=texts)


def eos_token_ids_of(tokenizer: Any, model_config: Any = None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    config_eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    for value in config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        raise ValueError("the tokenizer has no EOS token, so responses could never stop")
    return ids


Weights = Any  # the trainer's policy module, or its state dict
# progress(sequences finished so far): how an engine reports during generate() (for a person
# watching a long step; tre_cli.trainer.progress). Never changes what is sampled.
Progress = Callable[[int], None]


@runtime_checkable
class RolloutEngine(Protocol):
    """The interface the trainer and the evaluation code against; see hf.py and vllm.py."""

    name: str
    tokenizer: Any  # what Rollout.texts are decoded with (and rollout.stop strings found by)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stream: int | None = None,
        first_sequence: int = 0,
        progress: Progress | None = None,
    ) -> Rollout:
        """n samples per prompt (token ids), grouped by prompt; see Rollout. Sample k is
        sequence `first_sequence + k` of sampling stream `stream` (the trainer's step; None: the
        engine's next call): its noise depends on the engine's seed, the stream and that index,
        not on the other prompts of the call, where the engine can do so. `progress`,
        when given, is called with the number of finished sequences (of len(prompts) * n) as
        they end."""
        ...

    def sync_weights(self, weights: Weights = None) -> None:
        """Make the engine sample from the trainer's current weights (the policy module, or its
        state dict); each engine decides what that takes (nothing, for one that samples from the
        policy module itself)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory while the trainer trains (no-op where unsupported)."""
        ...

    def wake(self) -> None:
        """Undo sleep() before the next generate()."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


class EngineBase:
    """What engines share: no sleeping, waking or closing unless they override it."""

    name = "base"

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass
