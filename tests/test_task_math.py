"""MATH: boxed extraction, the Hendrycks/lm-eval normalisation, hostile inputs, data loading and
the optional math-verify judge."""

from __future__ import annotations

import json
import random
import time

import pytest

from tre_cli.tasks import get_task
from tre_cli.tasks.math import MathRules, is_equiv, last_boxed, reference_answer, score, strip_string


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\sqrt{a^{2}+b}} end", "\\sqrt{a^{2}+b}"),
        ("$\\boxed 5$ trailing", "5"),
        ("$\\boxed  x = 5 $", " x = 5 "),  # as written up to the $: normalisation handles spaces
        ("unbalanced \\boxed{1 + {2}", None),
        ("no box here", None),
        ("\\boxed", None),
        ("\\boxedx{5}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# (case, rule, response, reference answer, released code, tre default, option, score under it)
RULE_CASES = [
    ("boxed right", "ordinary", "so $\\boxed{\\dfrac{3}{4}}$.", "\\frac34", 1, 1, None),
    ("last box counts", "ordinary", "answer \\boxed{4} oh wait \\boxed{5}", "5", 1, 1, None),
    ("an earlier box does not", "ordinary", "answer \\boxed{4} oh wait \\boxed{5}", "4", 0, 0, None),
    ("no box", "ordinary", "the answer is 5", "5", 0, 0, None),
    ("space form", "ordinary", "so $\\boxed 5$.", "5", 1, 1, None),
    ("fbox", "fbox", "so $\\fbox{5}$.", "5", 0, 0, ("fbox", True, 1)),
    ("fbox after a boxed", "fbox", "\\boxed{4} no: \\fbox{5}", "5", 0, 0, ("fbox", True, 1)),
    ("space form before a later boxed{}", "space_boxed_first", "try $\\boxed 4$, no: $\\boxed{5}$", "5", 0, 0,
     ("space_boxed_first", False, 1)),
    ("space form after a boxed{}", "space_boxed_first", "$\\boxed{4}$, no: $\\boxed 5$", "5", 1, 1, None),
    ("a/b of non-integers, spaced", "slash_fallback", "\\boxed{12^{1 / 7}}", "12^{1/7}", 1, 1, ("slash_fallback", "raw", 0)),
    ("a/b of non-integers, as written", "slash_fallback", "\\boxed{12^{1/7}}", "12^{1/7}", 1, 1, ("slash_fallback", "raw", 1)),
    ("\\frac with one character after it", "fix_fracs (a tre bug, fixed)", "\\boxed{\\frac1}", "\\frac1", 1, 1, None),
    ("\\frac with one character, spaced", "fix_fracs (a tre bug, fixed)", "\\boxed{ \\frac1}", "\\frac1", 1, 1, None),
    ("\\frac at the end: raw compare", "fix_fracs", "\\boxed{ 2\\frac}", "2\\frac", 0, 0, None),
]


@pytest.mark.parametrize("case", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_tre_default_is_the_released_rule(case):
    _, _, response, answer, released, default, _ = case
    assert score(response, answer) == default == released


@pytest.mark.parametrize("case", [c for c in RULE_CASES if c[6]], ids=[c[0] for c in RULE_CASES if c[6]])
def test_the_option_that_names_the_other_reading(case):
    _, _, response, answer, _, _, (option, value, expected) = case
    assert score(response, answer, MathRules(**{option: value})) == expected
    assert get_task("math", **{option: value}).reward(response, {"problem": "p", "answer": answer}) == expected


def test_bad_rule_options_name_the_option():
    with pytest.raises(ValueError, match="fbox must be true or false"):
        get_task("math", fbox="yes")
    with pytest.raises(ValueError, match="slash_fallback must be 'normalize' or 'raw'"):
        get_task("math", slash_fallback="lm-eval")


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
    # Both references: several "\\text{ " raise inside strip_string and is_equiv compares raw.
    assert strip_string("\\frac{1}{2}") == "\\frac{1}{2}"
    assert is_equiv("5\\text{ a}\\text{ b}", "5\\text{ a}\\text{ b}")
    assert not is_equiv("5 \\text{ a}\\text{ b}", "5\\text{ a}\\text{ b}")
    # a/b of non-integers: the released code keeps normalising, lm-eval compares raw.
    assert strip_string("x / y") == "x/y" and is_equiv("x / y", "x/y")
    lm_eval = MathRules(slash_fallback="raw")
    assert is_equiv("x/y", "x/y", lm_eval) and not is_equiv("x / y", "x/y", lm_eval)
    assert not is_equiv("x/y", "\\frac{x}{y}")


def test_score():
    assert score("Thus the answer is $\\boxed{\\dfrac{3}{4}}$.", "\\frac34") == 1.0
    assert score(None, "5") == 0.0


HOSTILE = {
    "10 MB of text": "a" * 10_000_000,
    "10 MB boxed": "\\boxed{" + "1" * 10_000_000 + "}",
    "10 MB space-form boxed": "\\boxed " + "1" * 10_000_000,
    "deep braces": "\\boxed{" + "{" * 100_000 + "5" + "}" * 100_000 + "}",
    "many boxes": "\\boxed{1}" * 1_000_000,
    "many space-form boxes": "\\boxed 1$" * 1_000_000,
    "many fracs": "\\boxed{" + "\\frac" * 2000 + "}",
    "trailing sqrt": "\\boxed{2\\sqrt}",
    "unicode": "\\boxed{\u0665}",
    "many units": "\\boxed{5\\text{ a}\\text{ b}}",
    "huge a/b": "\\boxed{" + "9" * 5000 + "/" + "9" * 5000 + "}",
}
READINGS = {"released": MathRules(), "other": MathRules(fbox=True, space_boxed_first=False, slash_fallback="raw")}


@pytest.mark.parametrize("reading", list(READINGS))
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_returns_a_float_fast(name, reading):
    start = time.perf_counter()
    value = score(HOSTILE[name], "5", READINGS[reading])
    elapsed = time.perf_counter() - start
    assert isinstance(value, float) and value in (0.0, 1.0)
    assert elapsed < 0.5, f"{name} took {elapsed:.2f}s"


def test_random_strings_never_crash_or_hang():
    rng = random.Random(3)
    pieces = ["\\boxed", "\\boxed ", "\\fbox", "{", "}", "$", "\\frac", "\\sqrt", "/", "=", " ", "\\text{ ",
              "1", "2", "x", ".", "\\left", "\\!", "\\\\", "^\\circ", "\\%", "\n"]
    start = time.perf_counter()
    for i in range(3000):
        if i % 3 == 0:
            text = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 40)))
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        answer = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        for rules in READINGS.values():
            value = score(text, answer, rules)
            assert isinstance(value, float) and value in (0.0, 1.0)
    assert time.perf_counter() - start < 20


def test_reference_answer_sources():
    row = {"problem": "p", "solution": "so $\\boxed{\\text{(C)}}$", "answer": "{(C)}"}
    assert reference_answer(row) == "\\text{(C)}"
    assert reference_answer(row, prefer="answer") == "{(C)}"
    assert reference_answer({"problem": "p", "solution": "no box", "answer": "3"}) == "3"
    assert reference_answer({"problem": "p", "solution": "\\boxed{4}", "answer": ""}, prefer="answer") == "4"
    # A solution's own last box, whatever its form (the released preprocessing would take "{17}.").
    assert reference_answer({"problem": "p", "solution": "$\\boxed {17}.$ Or: $\\boxed{17}$"}) == "17"


ROWS = [
    {"problem": "What is 1+1?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Half of 1?", "solution": "$\\boxed{\\frac{1}{2}}$", "answer": "\\frac{1}{2}"},
    {"problem": "3*3?", "solution": "$\\boxed{9}$"},
]


def test_task_loads_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in ("problem", "solution")} for r in ROWS]), tmp_path / "test.parquet")
    task = get_task("math", train_source=str(tmp_path), test_source=str(tmp_path / "test.parquet"), test_size=2)
    train, test = task.load("train"), task.load("test")
    assert [e["answer"] for e in train] == ["2", "\\frac{1}{2}", "9"]
    assert [e["answer"] for e in test] == ["2", "\\frac{1}{2}"]
    assert task.rewards([e["solution"] for e in train], train) == [1.0, 1.0, 1.0]
    assert task.rewards(["\\boxed{3}", "\\boxed{0.5}", "9"], train) == [0.0, 1.0, 0.0]
    text = get_task("math", template="raw").render(train[0], None)
    assert text == "User: What is 1+1? Let's think step by step and output the final answer within \\boxed{}.\nAssistant:"


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
    assert "no-such-org/no-such-math" in last and "task.options.train_source=PATH" in last


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
