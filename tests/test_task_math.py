"""MATH: boxed extraction, the Hendrycks/lm-eval normalisation, hostile inputs, data loading and
the optional math-verify judge."""

from __future__ import annotations

import json
import time

import pytest

from tre_cli.tasks import get_task
from tre_cli.tasks.math import is_equiv, last_boxed, reference_answer, score, strip_string


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\sqrt{a^{2}+b}} end", "\\sqrt{a^{2}+b}"),
        ("$\\boxed 5$ trailing", "5"),
        ("\\fbox{7}", "7"),
        ("unbalanced \\boxed{1 + {2}", None),
        ("no box here", None),
        ("\\boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "candidate, reference",
    [
        ("\\dfrac{1}{2}", "\\frac12"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("x = 5", "5"),
        ("12 \\text{ cm}", "12"),
        ("\\sqrt3", "\\sqrt{3}"),
        (".5", "0.5"),
        ("\\$10", "10"),
    ],
)
def test_normalisation_rules_match(candidate, reference):
    assert is_equiv(candidate, reference)


@pytest.mark.parametrize("candidate, reference", [("2", "3"), ("\\frac{1}{3}", "0.33"), ("x+1", "1+x"), ("", "0")])
def test_normalisation_does_not_over_match(candidate, reference):
    assert not is_equiv(candidate, reference)


def test_failed_normalisation_falls_back_to_raw_equality():
    # lm-eval: `a/b` with non-integers raises inside strip_string, and is_equiv compares raw.
    assert strip_string("\\frac{1}{2}") == "\\frac{1}{2}"
    assert is_equiv("x/y", "x/y")
    assert not is_equiv("x/y", "\\frac{x}{y}")


def test_score():
    assert score("Thus the answer is $\\boxed{\\dfrac{3}{4}}$.", "\\frac34") == 1.0
    assert score("answer \\boxed{4} oh wait \\boxed{5}", "5") == 1.0
    assert score("answer \\boxed{4} oh wait \\boxed{5}", "4") == 0.0
    assert score("the answer is 5", "5") == 0.0
    assert score(None, "5") == 0.0


HOSTILE = {
    "10 MB of text": "a" * 10_000_000,
    "10 MB boxed": "\\boxed{" + "1" * 10_000_000 + "}",
    "deep braces": "\\boxed{" + "{" * 100_000 + "5" + "}" * 100_000 + "}",
    "many boxes": "\\boxed{1}" * 1_000_000,
    "many fracs": "\\boxed{" + "\\frac" * 2000 + "}",
    "trailing sqrt": "\\boxed{2\\sqrt}",
    "unicode": "\\boxed{\u0665}",
    "many units": "\\boxed{5\\text{ a}\\text{ b}}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_returns_a_float_fast(name):
    start = time.perf_counter()
    value = score(HOSTILE[name], "5")
    elapsed = time.perf_counter() - start
    assert isinstance(value, float) and value in (0.0, 1.0)
    assert elapsed < 0.5, f"{name} took {elapsed:.2f}s"


def test_reference_answer_sources():
    row = {"problem": "p", "solution": "so $\\boxed{\\text{(C)}}$", "answer": "{(C)}"}
    assert reference_answer(row) == "\\text{(C)}"
    assert reference_answer(row, prefer="answer") == "{(C)}"
    assert reference_answer({"problem": "p", "solution": "no box", "answer": "3"}) == "3"
    assert reference_answer({"problem": "p", "solution": "\\boxed{4}", "answer": ""}, prefer="answer") == "4"


ROWS = [
    {"problem": "What is 1+1?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Half of 1?", "solution": "$\\boxed{\\frac{1}{2}}$", "answer": "\\frac{1}{2}"},
    {"problem": "3*3?", "solution": "$\\boxed{9}$"},
]


def test_task_loads_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(
        pa.Table.from_pylist([{k: r.get(k) for k in ("problem", "solution")} for r in ROWS]), tmp_path / "test.parquet"
    )
    task = get_task("math", train_source=str(tmp_path), test_source=str(tmp_path / "test.parquet"), test_size=2)
    train, test = task.load("train"), task.load("test")
    assert [e["answer"] for e in train] == ["2", "\\frac{1}{2}", "9"]
    assert [e["answer"] for e in test] == ["2", "\\frac{1}{2}"]
    assert task.rewards([e["solution"] for e in train], train) == [1.0, 1.0, 1.0]
    assert task.rewards(["\\boxed{3}", "\\boxed{0.5}", "9"], train) == [0.0, 1.0, 0.0]
    text = get_task("math", template="raw").render(train[0], None)
    assert (
        text == "User: What is 1+1? Let's think step by step and output the final answer within \\boxed{}.\nAssistant:"
    )


def test_missing_file_and_hub_failures_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        get_task("math", train_source=str(tmp_path / "nope.jsonl")).load("train")
    with pytest.raises(ValueError, match="needs 'problem'"):
        (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
        get_task("math", train_source=str(tmp_path / "bad.jsonl")).load("train")
    with pytest.raises(ValueError, match="verifier"):
        get_task("math", verifier="sympy")


def test_hub_id_offline_names_the_id_and_the_local_path_option(tmp_path):
    import os
    import subprocess
    import sys

    code = "from tre_cli.tasks import get_task; get_task('math', train_source='no-such-org/no-such-math').load('train')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "no-such-org/no-such-math" in last and "task.train_source=PATH" in last


def test_math_verify_judge_and_its_timeout():
    pytest.importorskip("math_verify")
    task = get_task("math", verifier="math_verify", verify_timeout_s=60)
    example = {"problem": "p", "answer": "\\frac{1}{2}"}
    assert task.reward("\\boxed{\\frac{2}{4}}", example) == 1.0  # exact rules say no, sympy says yes
    assert task.reward("\\boxed{\\frac{2}{5}}", example) == 0.0
    # A timeout shorter than the worker's start-up: the call gives up, kills the worker, scores 0.
    impatient = get_task("math", verifier="math_verify", verify_timeout_s=0.001)
    start = time.perf_counter()
    assert impatient.reward("\\boxed{\\frac{2}{4}}", example) == 0.0
    assert time.perf_counter() - start < 10
