"""Reward checks on real data and scoring throughput (a benchmark, not a test).

    .venv/bin/python bench/scoring.py --data ../shared/data [--n 10000]

1. Every reference solution scored as a response (Countdown: the solution wrapped in the
   expected <think>/<answer> format; MATH: the worked solution itself): the fraction judged
   correct, with every miss listed.
2. Throughput in responses per second on N responses per task: Countdown responses are the
   test set's solutions, half of them corrupted (wrong number, wrong operator, broken format),
   MATH responses the worked solutions padded to realistic length plus as many wrong answers.
Without --data, Countdown uses the built-in generator and MATH is skipped.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path


def countdown_check(data: Path | None, n: int) -> None:
    from tre_cli.tasks import get_task

    options = {"train_size": None, "test_size": None}
    if data is not None:
        options.update(train_source=str(data / "countdown"), test_source=str(data / "countdown"))
    else:
        options.update(train_size=7500, test_size=5000)
    task = get_task("countdown", **options)
    for split in ("train", "test"):
        examples = task.load(split)
        responses = [f"<think>search</think>\n<answer>{e['solution']}</answer>" for e in examples]
        scores = task.rewards(responses, examples)
        misses = [(e, s) for e, s in zip(examples, scores) if s != 1.0]
        print(f"countdown {split}: {len(examples) - len(misses)}/{len(examples)} reference solutions judged correct")
        for example, _ in misses:
            print(f"  miss: {example}")

    examples = task.load("test")
    rng = random.Random(0)
    responses, batch = [], []
    for i in range(n):
        example = examples[i % len(examples)]
        expression = example["solution"]
        kind = i % 4
        if kind == 1:
            expression = expression.replace("+", "*", 1)
        elif kind == 2:
            expression = f"{expression} + {rng.randint(1, 9)}"
        think = "Let me try some combinations. " * rng.randint(5, 40)
        response = f"<think>{think}</think>\n<answer>{expression}</answer>"
        if kind == 3:
            response = response.replace("</think>", "")
        responses.append(response)
        batch.append(example)
    start = time.perf_counter()
    scores = task.rewards(responses, batch)
    elapsed = time.perf_counter() - start
    print(
        f"countdown throughput: {n} responses in {elapsed:.3f} s = {n / elapsed:,.0f} responses/s "
        f"(mean length {sum(map(len, responses)) / n:,.0f} chars, mean reward {sum(scores) / n:.3f})"
    )


def math_check(data: Path, n: int) -> None:
    from tre_cli.tasks import get_task
    from tre_cli.tasks.math import score

    for reference in ("solution", "answer"):
        task = get_task("math", train_source=str(data / "math"), test_source=str(data / "math"), reference=reference)
        for split in ("train", "test"):
            examples = task.load(split)
            scores = task.rewards([e["solution"] for e in examples], examples)
            misses = [e for e, s in zip(examples, scores) if s != 1.0]
            print(
                f"math {split} (reference from {reference}): {len(examples) - len(misses)}/{len(examples)} "
                "reference solutions judged correct"
            )
            for example in misses:
                from tre_cli.tasks.math import last_boxed

                print(f"  miss: boxed {last_boxed(example['solution'])!r} vs answer {example['answer']!r}")

    task = get_task("math", test_source=str(data / "math"))
    examples = task.load("test")
    rng = random.Random(0)
    responses, answers = [], []
    for i in range(n):
        example = examples[i % len(examples)]
        # Real responses are long chains of thought: pad the worked solution to about 2,000 chars.
        filler = "We proceed step by step and check each case carefully. " * rng.randint(10, 50)
        solution = example["solution"] if i % 2 == 0 else example["solution"] + " So the answer is $\\boxed{7}$."
        responses.append(filler + solution)
        answers.append(example["answer"])
    start = time.perf_counter()
    scores = [score(r, a) for r, a in zip(responses, answers)]
    elapsed = time.perf_counter() - start
    print(
        f"math throughput: {n} responses in {elapsed:.3f} s = {n / elapsed:,.0f} responses/s "
        f"(mean length {sum(map(len, responses)) / n:,.0f} chars, mean reward {sum(scores) / n:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with countdown/, math/ (JSONL)")
    parser.add_argument("--n", type=int, default=10_000, help="responses per task for throughput")
    args = parser.parse_args()
    if args.data is not None and not args.data.exists():
        sys.exit(f"error: {args.data} does not exist")
    countdown_check(args.data, args.n)
    if args.data is not None:
        math_check(args.data, args.n)


if __name__ == "__main__":
    main()
