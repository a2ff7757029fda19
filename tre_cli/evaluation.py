"""The paper's evaluation protocol: n samples per test prompt at temperature 1.0, top-p 0.7,
scored by the task's metric (tasks.task_metric): Pass@1 (mean correctness) for MATH and
Countdown, mean reward for HH."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tre_cli.rollout.base import RolloutEngine
    from tre_cli.tasks import TaskProtocol

# A response counts as correct when its reward reaches this (rule-based rewards are 0 or 1; a
# format score such as TinyZero's 0.1 is not a solve).
CORRECT = 1.0 - 1e-9
METRICS = ("pass@1", "mean_reward")


@dataclass(frozen=True)
class EvalResult:
    score: float  # the protocol's metric
    metric: str
    mean_reward: float
    n_prompts: int
    n_samples: int
    mean_response_tokens: float

    def extra(self) -> dict[str, float]:
        return {"eval/mean_reward": self.mean_reward, "eval/response_tokens": self.mean_response_tokens}


def score_of(rewards: Sequence[float], metric: str) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown eval metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if not rewards:
        return float("nan")
    if metric == "pass@1":
        return sum(1.0 for r in rewards if r >= CORRECT) / len(rewards)
    return sum(rewards) / len(rewards)


def evaluate(
    engine: RolloutEngine,
    task: TaskProtocol,
    examples: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    *,
    n_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    metric: str,
    batch_prompts: int = 64,
    stream: int | None = None,
    progress: Callable[[int], None] | None = None,
    stop: Sequence[str] = (),
) -> EvalResult:
    """Sample `n_samples` responses per prompt with `engine`, score them with `task`. `stream`:
    the engine's sampling stream (sample j of prompt i is sequence i * n_samples + j
    of it, whatever batch_prompts is); None: one stream per engine call. `progress(sequences
    finished so far)` is called as they end (for a person watching). `stop`: rollout.stop (a
    response ends at the first of these strings; see cut_at_stop)."""
    if len(examples) != len(prompt_ids):
        raise ValueError(f"{len(examples)} examples but {len(prompt_ids)} prompts")
    if not examples:
        raise ValueError("no test examples to evaluate on")
    from tre_cli.rollout.base import cut_at_stop

    rewards: list[float] = []
    tokens = 0
    for start in range(0, len(examples), batch_prompts):
        batch = list(range(start, min(start + batch_prompts, len(examples))))
        offset = len(rewards)
        report = (lambda done: progress(offset + done)) if progress is not None else None
        rollout = engine.generate([prompt_ids[i] for i in batch], n=n_samples, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, stream=stream,
                                  first_sequence=start * n_samples, progress=report)
        rollout = cut_at_stop(rollout, stop, engine.tokenizer)
        answered = [examples[batch[int(i)]] for i in rollout.prompt_index]
        rewards.extend(task.rewards(rollout.texts, answered))
        tokens += rollout.num_response_tokens
    return EvalResult(
        score=score_of(rewards, metric),
        metric=metric,
        mean_reward=sum(rewards) / len(rewards),
        n_prompts=len(examples),
        n_samples=n_samples,
        mean_response_tokens=tokens / len(rewards),
    )
