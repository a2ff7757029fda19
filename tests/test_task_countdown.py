"""Countdown: the reward rules at the edges (against a test-only transcription of the released
rule), hostile inputs, the generator and solver, the task and its CLI."""

from __future__ import annotations

import itertools
import json
import random
import re
import time
import warnings
from fractions import Fraction

import pytest

from tre_cli.tasks import countdown
from tre_cli.tasks.countdown import CountdownRules, evaluate, generate, score, solve


def wrap(expression: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think>\n<answer>{expression}</answer>"


# ----------------------------------------------------------------------------- the released rule

RELEASED_FORMAT = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>$", re.DOTALL)
RELEASED_CHARACTERS = re.compile(r"^[\d+\-*/().\s]+$")


def released_reference(response: str, numbers, target) -> float:
    """The released reward as REFERENCE.md ("Reward rules at the edges", "Tasks") describes it,
    written here with Python's own regex and eval as the brute-force reference. Test-only: eval
    runs only on strings that passed the digit/operator filter, and the fuzz below keeps `**`
    small. One assumption the description leaves open: the extracted answer is stripped."""
    match = RELEASED_FORMAT.search(response)
    if match is None:
        return 0.0
    equation = match.group(2).strip()
    try:
        if sorted(int(n) for n in re.findall(r"\d+", equation)) != sorted(numbers):
            return 0.0
    except ValueError:
        return 0.0
    if not RELEASED_CHARACTERS.match(equation):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'int' object is not callable" for 1(2)
        try:
            value = eval(equation, {"__builtins__": None}, {})  # noqa: S307 (filtered above; test-only)
            return 1.0 if abs(value - target) < 1e-5 else 0.0
        except Exception:
            return 0.0


N, T = [26, 44, 33, 88], 85  # 26 * (88 / 44) + 33 = 85
E = "26 * (88 / 44) + 33"

# (case, rule it exercises, response, numbers, target, released code, tre default, option that
# changes it or None, the score under that option)
RULE_CASES = [
    ("right answer", "ordinary", wrap(E), N, T, 1, 1, None),
    ("precedence", "ordinary", wrap("26*88/44+33"), N, T, 1, 1, None),
    ("wrong value", "ordinary", wrap("26 * 88 / 44 - 33"), N, T, 0, 0, None),
    ("numbers not the given multiset", "ordinary", wrap("26 * 2 + 33"), N, T, 0, 0, None),
    ("an extra number", "ordinary", wrap(E + " + 0"), N, T, 0, 0, None),
    ("a number missing", "ordinary", wrap("26 * (88 / 44)"), N, T, 0, 0, None),
    ("'=' in the answer", "ordinary", wrap(E + " = 85"), N, T, 0, 0, None),
    ("no think block", "format", f"<answer>{E}</answer>", N, T, 0, 0, None),
    ("text after the answer", "format", wrap(E) + " trailing", N, T, 0, 0, None),
    ("text between think and answer", "format", f"<think>a</think> x <answer>{E}</answer>", N, T, 0, 0, None),
    ("text before think", "format", "preamble " + wrap(E), N, T, 1, 1, None),
    ("no space between the blocks", "format", f"<think>a</think><answer>{E}</answer>", N, T, 1, 1, None),
    ("answer tag inside think", "format", f"<think>a <answer>1</answer></think><answer>{E}</answer>", N, T, 1, 1, None),
    ("one newline after </answer>", "trailing_whitespace", wrap(E) + "\n", N, T, 1, 1, None),
    (
        "two newlines after </answer>",
        "trailing_whitespace",
        wrap(E) + "\n\n",
        N,
        T,
        0,
        0,
        ("trailing_whitespace", "any", 1),
    ),
    ("a space after </answer>", "trailing_whitespace", wrap(E) + " ", N, T, 0, 0, ("trailing_whitespace", "any", 1)),
    (
        "spaces and a newline after </answer>",
        "trailing_whitespace",
        wrap(E) + "  \n",
        N,
        T,
        0,
        0,
        ("trailing_whitespace", "any", 1),
    ),
    (
        "second block, last right",
        "repeated_blocks",
        "<think>x</think><answer>26 + 44</answer>\n<think>y</think>\n<answer>" + E + "</answer>",
        N,
        T,
        0,
        0,
        ("repeated_blocks", "last", 1),
    ),
    (
        "second block, first right",
        "repeated_blocks",
        f"<think>x</think><answer>{E}</answer><think>y</think><answer>26 + 44</answer>",
        N,
        T,
        0,
        0,
        ("repeated_blocks", "last", 0),
    ),
    (
        "newline between tokens",
        "answer_newlines",
        wrap("26 * (88 / 44)\n+ 33"),
        N,
        T,
        0,
        0,
        ("answer_newlines", "space", 1),
    ),
    ("CR between tokens", "answer_newlines", wrap("26 * (88 / 44)\r+ 33"), N, T, 0, 0, ("answer_newlines", "space", 1)),
    ("newline inside parentheses", "answer_newlines", wrap("(26 * (88 / 44)\n+ 33)"), N, T, 1, 1, None),
    ("answer on its own line", "answer_newlines", f"<think>a</think>\n<answer>\n{E}\n</answer>", N, T, 1, 1, None),
    ("unary plus", "unary plus (a tre bug, fixed)", wrap("+26 * (88 / 44) + 33"), N, T, 1, 1, None),
    (
        "unary plus before parentheses",
        "unary plus (a tre bug, fixed)",
        wrap("+(26 * (88 / 44)) + 33"),
        N,
        T,
        1,
        1,
        None,
    ),
    ("unary minus", "ordinary", wrap("33 - -26 * (88 / 44)"), N, T, 1, 1, None),
    ("47. for 47", "trailing_dot", wrap("26. * (88 / 44) + 33"), N, T, 1, 1, ("trailing_dot", False, 0)),
    ("loophole //", "loopholes", wrap("26 * (88 // 44) + 33"), N, T, 1, 0, ("loopholes", True, 1)),
    ("loophole **", "loopholes", wrap("3 ** 2 * 1"), [3, 2, 1], 9, 1, 0, ("loopholes", True, 1)),
    ("loophole decimal joins 1 and 5", "loopholes", wrap("1.5 * 10"), [1, 5, 10], 15, 1, 0, ("loopholes", True, 1)),
    ("loophole leading-dot decimal", "loopholes", wrap(".5 * 60"), [5, 60], 30, 1, 0, ("loopholes", True, 1)),
    ("leading zero", "ordinary", wrap("01 + 2"), [1, 2], 3, 0, 0, None),
    ("division by zero", "ordinary", wrap("1 / (2 - 2)"), [1, 2, 2], 3, 0, 0, None),
    ("exact thirds", "ordinary", wrap("(1 / 3) * 3 + 9"), [1, 3, 3, 9], 10, 1, 1, None),
    ("within 1e-5 only", "ordinary", wrap("7 / 2 + 10"), [7, 2, 10], 13, 0, 0, None),
]
CASE_IDS = [case[0] for case in RULE_CASES]
# tre's reading before it followed the released code at the edges.
LENIENT = CountdownRules(trailing_whitespace="any", repeated_blocks="last", answer_newlines="space")


@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_the_table_states_what_the_released_rule_does(case):
    _, _, response, numbers, target, released, _, _ = case
    assert released_reference(response, numbers, target) == released


@pytest.mark.parametrize("case", RULE_CASES, ids=CASE_IDS)
def test_tre_default(case):
    _, _, response, numbers, target, _, default, _ = case
    assert score(response, numbers, target) == default


@pytest.mark.parametrize("case", [c for c in RULE_CASES if c[7]], ids=[c[0] for c in RULE_CASES if c[7]])
def test_the_option_that_names_the_other_reading(case):
    _, _, response, numbers, target, _, _, (option, value, expected) = case
    assert score(response, numbers, target, rules=CountdownRules(**{option: value})) == expected
    from tre_cli.tasks import get_task

    task = get_task("countdown", **{option: value})
    assert task.reward(response, {"nums": numbers, "target": target}) == expected


def test_defaults_are_the_released_code_except_the_loopholes():
    assert CountdownRules() == CountdownRules("newline", "zero", "python", True, False)
    released = CountdownRules(loopholes=True)
    for _, _, response, numbers, target, expected, _, _ in RULE_CASES:
        assert score(response, numbers, target, rules=released) == expected


def test_the_old_tre_reading_is_one_set_of_options():
    assert score("preamble " + wrap(E) + "  \n", N, T, rules=LENIENT) == 1.0
    assert (
        score(
            "<think>x</think><answer>1+2+3</answer><think>y</think><answer>6 - 1 - 2 - 3</answer>",
            [6, 1, 2, 3],
            0,
            rules=LENIENT,
        )
        == 1.0
    )


def test_format_score_option():
    assert score(wrap("1 + 2"), [1, 2], 4, format_score=0.1) == pytest.approx(0.1)
    assert score(wrap("1 + 2 + 5"), [1, 2], 4, format_score=0.1) == pytest.approx(0.1)  # wrong numbers
    assert score(wrap("1 // 2"), [1, 2], 4, format_score=0.1) == pytest.approx(0.1)  # a closed loophole
    assert score(wrap("1 + 2"), [1, 2], 3, format_score=0.1) == 1.0
    assert score("no tags at all", [1, 2], 3, format_score=0.1) == 0.0  # malformed gets nothing
    assert score(wrap("1 + 2") + "\n\n", [1, 2], 3, format_score=0.1) == 0.0  # the format decides


# ----------------------------------------------------------------------------- fuzz against the reference

EXPRESSION_PIECES = ["1", "2", "3", "12", "0", "00", "01", "5.", ".5", "2.5", ".", "+", "-", "*", "/", "**", "//",
                     "(", ")", "(", ")", " ", " ", "\n", "\r", "\t", "\x0c", "\x0b", "\xa0", "x", "="]
FRAME_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "a", " ", "\n", "\x85", "EXPR"]
GAPS = ["", " ", "\n", " x "]
ENDINGS = ["", "", "\n", "\n\n", " ", " \n", "\r\n", "x"]


ATOMS = ["1", "2", "3", "7", "12", "0", "00", "5.", ".5", "2.5"]
OPERATORS = ["+", "-", "*", "/", "+", "-", "*", "/", "//", "**"]
SPACING = ["", " ", " ", " ", "  ", "\n", "\t"]


def grammar_expression(rng: random.Random, depth: int = 0) -> str:
    """A well-formed expression most of the time: atoms, operators (loopholes included), unary
    signs, parentheses and odd spacing; `**` only with a one-digit exponent."""
    if depth > 2 or rng.random() < 0.3:
        text = rng.choice(ATOMS)
    else:
        operator = rng.choice(OPERATORS)
        right = rng.choice("123") if operator == "**" else grammar_expression(rng, depth + 1)
        text = grammar_expression(rng, depth + 1) + rng.choice(SPACING) + operator + rng.choice(SPACING) + right
    if rng.random() < 0.25:
        text = f"({rng.choice(SPACING)}{text}{rng.choice(SPACING)})"
    if rng.random() < 0.1:
        text = rng.choice("+-") + text
    return text


def random_expression(rng: random.Random) -> str:
    while True:
        if rng.random() < 0.6:
            text = grammar_expression(rng)
            if text.count("**") <= 1:
                return text
            continue
        text = "".join(rng.choice(EXPRESSION_PIECES) for _ in range(rng.randint(1, 12)))
        if text.count("**") <= 1 and "***" not in text:  # keeps the reference's eval small
            return text


def random_response(rng: random.Random) -> str:
    expression = random_expression(rng)
    if rng.random() < 0.6:
        prefix, think, gap = rng.choice(["", "so ", "<think>"]), rng.choice(["t", "", "a</think>b"]), rng.choice(GAPS)
        response = f"{prefix}<think>{think}</think>{gap}<answer>{expression}</answer>"
        if rng.random() < 0.2:
            response += f"<think>u</think><answer>{random_expression(rng)}</answer>"
    else:
        response = "".join(rng.choice(FRAME_PIECES) for _ in range(rng.randint(1, 10))).replace("EXPR", expression)
    return response + rng.choice(ENDINGS)


def reference_target(response: str) -> tuple[list, int]:
    """Numbers and a target that make the reference's answer right when it has a real value, so
    that the fuzz reaches the arithmetic instead of stopping at the multiset."""
    match = RELEASED_FORMAT.search(response)
    equation = match.group(2).strip() if match else ""
    numbers = [int(n) for n in re.findall(r"[0-9]+", equation)]
    value = None
    if equation and RELEASED_CHARACTERS.match(equation):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                value = eval(equation, {"__builtins__": None}, {})  # noqa: S307 (test-only, filtered)
            except Exception:
                value = None
    target = round(value) if isinstance(value, (int, float)) and abs(value) < 1e9 else 24
    return numbers, target


LOOPHOLE = re.compile(r"//|\*\*|[0-9]\.[0-9]|(?<![0-9])\.[0-9]")


def test_fuzz_agrees_with_the_released_reference():
    """Random frames and expressions: tre with the loopholes open is the released rule exactly;
    tre's default differs only where the answer uses a loophole, and there it scores 0."""
    rng = random.Random(11)
    released, default = CountdownRules(loopholes=True), CountdownRules()
    checked = rights = loophole_rights = 0
    for _ in range(10_000):
        response = random_response(rng)
        numbers, target = reference_target(response)
        expected = released_reference(response, numbers, target)
        got = score(response, numbers, target, rules=released)
        assert got == expected, (response, numbers, target)
        match = RELEASED_FORMAT.search(response)
        uses_loophole = bool(match and LOOPHOLE.search(match.group(2)))
        assert score(response, numbers, target, rules=default) == (0.0 if uses_loophole else expected), response
        checked += 1
        rights += expected == 1.0
        loophole_rights += expected == 1.0 and uses_loophole
    # The fuzz reaches right answers, loopholes included (seed 11: 405 and 121 of 10,000).
    assert checked == 10_000 and rights > 300 and loophole_rights > 90


HOSTILE = {
    "10 MB of text": "x" * 10_000_000,
    "10 MB inside the answer": wrap("1+" * 5_000_000 + "1"),
    "10 MB of tags": "<think>" * 700_000 + "</answer>" * 400_000,
    "10 MB of think tags then an answer": "<think>" + "</think> " * 1_000_000 + "<answer>1+1</answer>",
    "10 MB of whitespace after the answer": wrap("1+1") + " " * 10_000_000,
    "10 MB of whitespace after </think>": "<think>a</think>" + " " * 10_000_000 + "x<answer>1+2</answer>",
    "many think blocks and whitespace": ("<think>a</think>" + " " * 50) * 150_000 + "</answer>",
    "1M answer tags": "<answer>" * 1_000_000 + "</answer>",
    "1M think/answer pairs": "<think>" + "</think><answer>" * 600_000 + "</answer>",
    "5000 nested parentheses": wrap("(" * 5000 + "1+2" + ")" * 5000),
    "5000 unbalanced parentheses": wrap("(" * 5000 + "1+2"),
    "5000 unary minus": wrap("-" * 5000 + "3 + 1"),
    "5000 unary plus": wrap("+" * 5000 + "3 + 1"),
    "__import__": wrap("__import__('os').system('echo pwned')"),
    "unicode digits": wrap("\u0661 + \u0662"),  # Arabic-Indic 1 and 2
    "fullwidth digits": wrap("\uff11 + \uff12"),
    "division by zero": wrap("1 / (2 - 2)"),
    "floor division by zero": wrap("1 // (2 - 2)"),
    "power": wrap("1 ** 2"),
    "tower of powers": wrap("9 ** 9 ** 9 ** 9"),
    "huge power": wrap("99 ** 99999999"),
    "power of a negative base": wrap("(-1 - 2) ** .5"),
    "leading zero": wrap("01 + 2"),
    "empty answer": wrap(""),
    "only operators": wrap("+-*/()"),
    "huge integer": wrap("9" * 5000 + " - " + "9" * 5000),
    "nul and surrogates": wrap("1\x00+2\udcff"),
    "non-string": None,
}


@pytest.mark.parametrize(
    "rules", [CountdownRules(), CountdownRules(loopholes=True), LENIENT], ids=["default", "loopholes", "lenient"]
)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_returns_a_float_fast(name, rules):
    start = time.perf_counter()
    value = score(HOSTILE[name], [1, 2], 3, rules=rules)
    elapsed = time.perf_counter() - start
    assert isinstance(value, float)
    assert value == 0.0
    assert elapsed < 0.5, f"{name} took {elapsed:.2f}s"


def test_random_strings_never_crash_or_hang():
    """Strange strings of every kind: any code point, tag fragments, operators; each scores 0.0
    or 1.0 as a float, under every reading, quickly."""
    rng = random.Random(5)
    alphabet = list("0123456789+-*/(). \n\t=<>/abcdeghiknrstw") + [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "**",
        "//",
    ]
    readings = [
        CountdownRules(),
        CountdownRules(loopholes=True),
        CountdownRules(trailing_whitespace="any", repeated_blocks="last", answer_newlines="space", trailing_dot=False),
    ]
    start = time.perf_counter()
    for i in range(3000):
        if i % 3 == 0:
            text = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 40)))
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if i % 2:
            text = wrap(text)
        for rules in readings:
            value = score(text, [1, 2, 3], rng.randint(0, 30), rules=rules)
            assert isinstance(value, float) and value in (0.0, 1.0)
    assert time.perf_counter() - start < 20


def test_exact_value_is_rational():
    assert countdown.exact_value("(1 / 3) * 3") == 1 and isinstance(countdown.exact_value("1 / 3"), Fraction)
    assert countdown.exact_value("1 // 3") is None and countdown.exact_value("1 / 0") is None


def test_evaluate_admits_only_the_grammar():
    assert evaluate("-(1 - 4) * 2") == 6
    assert evaluate("7 / 2") == Fraction(7, 2)
    assert evaluate("2 * -3") == -6  # unary minus after an operator
    assert evaluate("+1") == 1 and evaluate("+(2 - 5)") == -3 and evaluate("-+-1") == 1
    assert evaluate("47.") == 47
    for text in (
        "1 +",
        "(1",
        "1)",
        "1 2",
        "1.5 + 1",
        ".5",
        "1e3",
        "a",
        "1 % 2",
        "1 // 2",
        "2 ** 3",
        "1 / 0",
        "1 * * 2",
    ):
        assert evaluate(text) is None, text


def test_loophole_arithmetic_is_pythons():
    rules = CountdownRules(loopholes=True)
    cases = ["7 // 2", "-7 // 2", "7.5 // 2", "2 ** -1", "-2 ** 2", "2 ** 3 ** 2", "(1 + 1) ** 10 // 3",
             "4 ** .5", "2.5 * .5", "12 // -5", "0 ** 0", "3 - -2 ** 2"]
    for text in cases:
        assert evaluate(text, rules) == eval(text), text  # noqa: S307 (literal cases)
    assert evaluate("(-8) ** .5", rules) == (-8) ** 0.5  # complex, as in Python: never a right answer
    assert evaluate("0 ** -1", rules) is None and evaluate("2 ** 99999", rules) is None


def test_bad_rule_options_name_the_option():
    from tre_cli.tasks import get_task

    with pytest.raises(ValueError, match="trailing_whitespace must be 'newline' or 'any'"):
        get_task("countdown", trailing_whitespace="none")
    with pytest.raises(ValueError, match="loopholes must be true or false"):
        get_task("countdown", loopholes="yes")


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


def test_response_prefix_opens_the_turn_and_the_reward_reads_it():
    from tre_cli.tasks import get_task
    from tre_cli.tasks.countdown import TINYZERO_PREFIX

    class Plain:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    example = {"nums": [1, 2], "target": 3}
    primed = get_task("countdown", response_prefix=TINYZERO_PREFIX)
    assert primed.render(example, Plain()).endswith("<assistant>Let me solve this step by step.\n<think>")
    # The sampled text continues inside the think block the prompt opened.
    assert primed.reward("1 + 2 = 3</think> <answer>1 + 2</answer>", example) == 1.0
    plain = get_task("countdown")
    assert plain.render(example, Plain()).endswith("<assistant>")
    assert plain.reward("1 + 2 = 3</think> <answer>1 + 2</answer>", example) == 0.0  # no opening tag
    with pytest.raises(ValueError, match="response_prefix must be a string"):
        get_task("countdown", response_prefix=3)
