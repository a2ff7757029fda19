"""Countdown: the reward rule, hostile inputs, the generator and solver, the task and its CLI."""

from __future__ import annotations

import itertools
import json
import random
import time
from fractions import Fraction

import pytest

from tre_cli.tasks import countdown
from tre_cli.tasks.countdown import evaluate, generate, score, solve


def wrap(expression: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think>\n<answer>{expression}</answer>"


# ----------------------------------------------------------------------------- reward rule


@pytest.mark.parametrize(
    "response, expected",
    [
        (wrap("(26 * (88 / 44)) + 33"), 1.0),
        (wrap("26*88/44+33"), 1.0),  # precedence: 26*2+33
        ("preamble " + wrap("33 + 26 * (88 / 44)") + "  \n", 1.0),  # text before, whitespace after
        (wrap("26 * 88 / 44 - 33"), 0.0),  # wrong value
        (wrap("26 * 2 + 33"), 0.0),  # numbers are not the given multiset
        (wrap("(26 * (88 / 44)) + 33 + 0"), 0.0),  # an extra number
        (wrap("26 * (88 / 44)"), 0.0),  # a number missing
        ("<answer>(26 * (88 / 44)) + 33</answer>", 0.0),  # no think block
        (wrap("(26 * (88 / 44)) + 33") + " trailing", 0.0),  # must end with the answer
        ("<think>a</think> x <answer>(26 * (88 / 44)) + 33</answer>", 0.0),  # text between
        (wrap("(26 * (88 / 44)) + 33 = 85"), 0.0),  # '=' is not allowed
        (wrap("26 ** 1 * (88 / 44) + 33"), 0.0),  # ** is not an operation here
    ],
)
def test_score_follows_the_released_rule(response, expected):
    assert score(response, [26, 44, 33, 88], 85) == expected


def test_last_answer_counts_and_unary_minus_is_admitted():
    assert score(wrap("-(4 - 12) * 3 + 0 - 0", "t"), [4, 12, 3, 0, 0], 24) == 1.0
    assert (
        score("<think>x</think><answer>1+2+3</answer><think>y</think><answer>6 - 1 - 2 - 3</answer>", [6, 1, 2, 3], 0)
        == 1.0
    )


def test_division_is_exact_and_within_tolerance():
    # 1/3 * 3 is exactly 1 with rationals; float evaluation would leave 0.9999999999999999.
    assert score(wrap("(1 / 3) * 3 + 9"), [1, 3, 3, 9], 10) == 1.0
    assert score(wrap("7 / 2 + 10"), [7, 2, 10], 13) == 0.0  # 13.5 is 0.5 away


def test_format_score_option():
    assert score(wrap("1 + 2"), [1, 2], 4, format_score=0.1) == pytest.approx(0.1)
    assert score(wrap("1 + 2 + 5"), [1, 2], 4, format_score=0.1) == pytest.approx(0.1)  # wrong numbers
    assert score(wrap("1 + 2"), [1, 2], 3, format_score=0.1) == 1.0
    assert score("no tags at all", [1, 2], 3, format_score=0.1) == 0.0  # malformed gets nothing


HOSTILE = {
    "10 MB of text": "x" * 10_000_000,
    "10 MB inside the answer": wrap("1+" * 5_000_000 + "1"),
    "10 MB of tags": "<think>" * 700_000 + "</answer>" * 400_000,
    "5000 nested parentheses": wrap("(" * 5000 + "1+2" + ")" * 5000),
    "5000 unbalanced parentheses": wrap("(" * 5000 + "1+2"),
    "5000 unary minus": wrap("-" * 5000 + "3 + 1"),
    "__import__": wrap("__import__('os').system('echo pwned')"),
    "unicode digits": wrap("\u0661 + \u0662"),  # Arabic-Indic 1 and 2
    "fullwidth digits": wrap("\uff11 + \uff12"),
    "division by zero": wrap("1 / (2 - 2)"),
    "power": wrap("1 ** 2"),
    "leading zero": wrap("01 + 2"),
    "empty answer": wrap(""),
    "only operators": wrap("+-*/()"),
    "huge integer": wrap("9" * 5000 + " - " + "9" * 5000),
    "nul and surrogates": wrap("1\x00+2\udcff"),
    "non-string": None,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_returns_a_float_fast(name):
    start = time.perf_counter()
    value = score(HOSTILE[name], [1, 2], 3)
    elapsed = time.perf_counter() - start
    assert isinstance(value, float)
    assert value == 0.0
    assert elapsed < 0.5, f"{name} took {elapsed:.2f}s"


def test_evaluate_admits_only_the_grammar():
    assert evaluate("-(1 - 4) * 2") == 6
    assert evaluate("7 / 2") == Fraction(7, 2)
    assert evaluate("2 * -3") == -6  # unary minus after an operator
    for text in ("1 +", "(1", "1)", "1 2", "+1", "1.5 + 1", "1e3", "a", "1 % 2", "1 // 2", "1 / 0"):
        assert evaluate(text) is None, text


# ----------------------------------------------------------------------------- solver, generator


def reachable_exact(values: list[Fraction]) -> set:
    """Every value reachable using each number exactly once (slow reference)."""
    if len(values) == 1:
        return {values[0]}
    out = set()
    for i, j in itertools.combinations(range(len(values)), 2):
        rest = [values[k] for k in range(len(values)) if k not in (i, j)]
        a, b = values[i], values[j]
        results = {a + b, a * b, a - b, b - a}
        if b:
            results.add(a / b)
        if a:
            results.add(b / a)
        for result in results:
            out |= reachable_exact(rest + [result])
    return out


def test_solve_agrees_with_exhaustive_search():
    rng = random.Random(7)
    for _ in range(60):
        nums = [rng.randint(1, 30) for _ in range(rng.choice((2, 3, 4)))]
        target = rng.randint(1, 60)
        truth = Fraction(target) in reachable_exact([Fraction(n) for n in nums])
        found = solve(nums, target)
        assert (found is not None) == truth, (nums, target, found)
        if found is not None:
            assert score(wrap(found), nums, target) == 1.0


def test_generate_is_deterministic_prefix_stable_and_valid():
    rows = generate(200, seed=3)
    assert rows == generate(200, seed=3)
    assert generate(50, seed=3) == rows[:50]
    assert rows != generate(200, seed=4)
    keys = {(tuple(sorted(r["nums"])), r["target"]) for r in rows}
    assert len(keys) == len(rows)
    for row in rows:
        assert len(row["nums"]) in (3, 4)
        assert all(1 <= n <= 99 for n in row["nums"])
        assert 10 <= row["target"] <= 100
        assert score(wrap(row["solution"]), row["nums"], row["target"]) == 1.0


def test_generated_train_and_test_never_overlap():
    train = generate(400, seed=1, split="train")
    test = generate(400, seed=1, split="test")
    key = lambda r: (tuple(sorted(r["nums"])), r["target"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}


# ----------------------------------------------------------------------------- task, CLI


def test_task_loads_generated_splits_and_scores_solutions():
    from tre_cli.tasks import get_task

    task = get_task("countdown", train_size=30, test_size=20)
    train, test = task.load("train"), task.load("test")
    assert len(train) == 30 and len(test) == 20
    assert len(task.load("train", limit=5)) == 5
    assert task.load("train", limit=5) == train[:5]
    responses = [wrap(e["solution"]) for e in test]
    assert task.rewards(responses, test) == [1.0] * 20
    assert task.rewards(["nothing"] * 20, test) == [0.0] * 20


def test_task_loads_a_local_jsonl(tmp_path):
    from tre_cli.tasks import get_task

    path = tmp_path / "cd.jsonl"
    path.write_text("\n".join(json.dumps({"nums": [1, 2, 3], "target": 6 + i}) for i in range(4)) + "\n")
    task = get_task("countdown", test_source=str(path), test_size=3)
    rows = task.load("test")
    assert rows == [
        {"nums": [1, 2, 3], "target": 6},
        {"nums": [1, 2, 3], "target": 7},
        {"nums": [1, 2, 3], "target": 8},
    ]


def test_raw_render_holds_the_paper_prompt():
    from tre_cli.tasks import get_task

    text = get_task("countdown", template="raw").render({"nums": [3, 5, 7], "target": 22}, None)
    assert text.startswith("User: Using the numbers [3, 5, 7], create an equation that equals 22.")
    assert "<answer>(1 + 2) / 3</answer>" in text and text.endswith("Assistant:")


def test_bad_options_name_the_problem():
    from tre_cli.tasks import get_task

    with pytest.raises(ValueError, match="format_scor"):
        get_task("countdown", format_scor=0.1)
    with pytest.raises(ValueError, match="format_score"):
        get_task("countdown", format_score=2)
    with pytest.raises(ValueError, match="split"):
        get_task("countdown").load("validation")


def test_cli_writes_solvable_instances(tmp_path):
    from typer.testing import CliRunner

    from tre_cli.tasks.cli import data_app

    out = tmp_path / "cd.jsonl"
    result = CliRunner().invoke(data_app, ["countdown", "--n", "25", "--seed", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == generate(25, 5)
    again = CliRunner().invoke(data_app, ["countdown", "--n", "5", "--out", str(out)])
    assert again.exit_code != 0 and "exists" in again.output
    assert countdown.PROMPT.count("{") == 2


def test_tre_data_countdown_is_registered_on_the_main_app(tmp_path):
    from typer.testing import CliRunner

    from tre_cli.cli import app

    out = tmp_path / "cd.jsonl"
    result = CliRunner().invoke(
        app, ["data", "countdown", "--n", "3", "--seed", "1", "--split", "test", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in out.read_text().splitlines()] == generate(3, 1, "test")
