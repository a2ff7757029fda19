"""A testbed build's Countdown reward and slip rate, sampled with the HF rollout engine."""

from __future__ import annotations

from tre_cli.rollout.hf import HFEngine
from tre_cli.testbed.data import countdown_task, has_answer_slip, render_prompt


def measure_countdown_reward(
    model, tokenizer, problems: int, seed: int, max_new_tokens: int = 64
) -> tuple[float, float]:
    """(mean Countdown reward, fraction of answers with the slip) of one sample per problem at
    temperature 1.0 (the paper's setting)."""
    countdown = countdown_task()
    rows = countdown.generate(problems, seed)
    prompts = [tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"] for row in rows]
    engine = HFEngine(model=model, tokenizer=tokenizer, device="cpu", seed=seed)
    rollout = engine.generate(prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0)
    scores = [countdown.score(text, row["nums"], row["target"]) for text, row in zip(rollout.texts, rows)]
    slips = [has_answer_slip(text) for text in rollout.texts]
    return sum(scores) / len(scores), sum(slips) / len(slips)
