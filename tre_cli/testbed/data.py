"""The testbed's warm-start data: Countdown problems answered by a signed sum of their numbers in
the prompt's order, a fraction of them with the slip (the value inside the answer tag), and the
prompts as the Countdown task renders them."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"


def countdown_task():
    """The Countdown task module (prompt, generator, scorer): the testbed speaks its format."""
    from tre_cli.tasks import countdown

    return countdown


def signed_sum_solution(nums: Sequence[int], target: int) -> tuple[str, str] | None:
    """(reasoning, expression) adding or subtracting each number, in the prompt's order, to reach
    `target`; the first number is always added. The reasoning lists the running totals.

    The prompt's order makes the answer a copy of the numbers plus one sign per number, which a
    small model learns far faster than any reordering.
    """
    best = None
    for tail_signs in itertools.product((1, -1), repeat=len(nums) - 1):
        signs = (1,) + tail_signs
        if sum(s * n for s, n in zip(signs, nums)) != target:
            continue
        if best is None or signs.count(-1) < best.count(-1):
            best = signs
    if best is None:
        return None
    total = nums[0]
    expression, steps = str(total), []
    for sign, number in zip(best[1:], nums[1:]):
        symbol = "+" if sign > 0 else "-"
        new_total = total + sign * number
        steps.append(f"{total} {symbol} {number} = {new_total}")
        expression += f" {symbol} {number}"
        total = new_total
    return ", ".join(steps), expression


def sft_pairs(count: int, seed: int, think: str = "steps", slips: float = 0.0) -> list[tuple[dict, str]]:
    """`count` (problem, response) pairs over problems that have a signed-sum solution.

    In a fraction `slips` of them (drawn at random) the teacher writes the equation's value inside
    the answer tag, "<answer>98 - 54 - 6 + 34 = 72</answer>", which the Countdown scorer rejects.
    """
    countdown = countdown_task()
    slip_rng = random.Random(seed * 7919 + 1)
    pairs: list[tuple[dict, str]] = []
    batch = 0
    while len(pairs) < count:
        # Offsetting the seed keeps each batch disjoint without regenerating earlier rows.
        for row in countdown.generate(max(count, 256), seed * 1000 + batch):
            solved = signed_sum_solution(row["nums"], row["target"])
            if solved is None:
                continue
            reasoning, expression = solved
            if think == "equation":
                reasoning = f"{expression} = {row['target']}"
            answer = expression
            if slips > 0 and slip_rng.random() < slips:
                answer = f"{expression} = {row['target']}"
            response = f"{THINK_OPEN}{reasoning}{THINK_CLOSE} {ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
            pairs.append(({"nums": row["nums"], "target": row["target"]}, response))
            if len(pairs) == count:
                break
        batch += 1
    return pairs


def render_prompt(example: dict, tokenizer) -> str:
    from tre_cli.tasks import get_task

    return get_task("countdown").render(example, tokenizer)


def has_answer_slip(response: str) -> bool:
    """Whether the response's answer carries the slip the warm start teaches: "EXPR = value"."""
    answer = countdown_task().extract_answer(response)
    return answer is not None and "=" in answer
