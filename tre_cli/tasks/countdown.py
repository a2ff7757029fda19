"""Countdown: reach a target with + - * / using each given number exactly once.

The reward follows the rule of the paper's released code (README, "Reward rules at the edges"):
the response must end with `<think>...</think>` then `<answer>EXPR</answer>`; the integers in
EXPR must equal the given numbers as a multiset; EXPR may hold only numbers, + - * /, parentheses,
unary signs and spaces; its value must be within 1e-5 of the target. How the edge cases read
(trailing whitespace, a second think/answer block, line breaks in EXPR, `47.`, and the released
code's loopholes `//`, `**` and `2.15`) is a `CountdownRules`, one task option each.

EXPR is read by the small parser below, never by `eval`, with Python's arithmetic (the value the
released code's `eval` computes), and every input (any size, any nesting, any characters)
returns a float in time linear in its length.

The generator and solver let Countdown run with no download at all.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any
from collections.abc import Mapping, Sequence

from tre_cli.tasks.base import Task, load_split_rows, render_user_prompt, resolve_options

PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think></think> tags. And return the final answer in <answer></answer> tags, for example "
    "<answer>(1 + 2) / 3</answer>."
)

TOLERANCE = 1e-5
# Limits that keep scoring linear and bounded whatever the model writes. A valid answer uses at
# most 4 numbers, so these are far above anything a correct expression needs.
MAX_ANSWER_CHARS = 2_000
MAX_TOKENS = 400
MAX_DEPTH = 100
# Integers wider than this are refused: without `**` (a loophole, off by default) no answer of
# MAX_ANSWER_CHARS reaches it. The released code's Python would compute them, slowly; such a
# number is far from any target.
MAX_VALUE_BITS = 65_536

DEFAULT_GENERATOR_SEED = 20_250_101
# TinyZero's opening of the assistant's Countdown turn (its `response_prefix`).
TINYZERO_PREFIX = "Let me solve this step by step.\n<think>"


@dataclass(frozen=True)
class CountdownRules:
    """How the reward reads the edge cases; each field is a task option of the same name.

    The defaults are the released reward code's behaviour, except the loopholes, which stay
    closed (the prompt allows + - * / on the given numbers only).
    """

    # "newline": `</answer>` may be followed by one "\n" and nothing else (released: its regex
    # ends in `</answer>$`); "any": by any whitespace.
    trailing_whitespace: str = "newline"
    # "zero": a second think/answer block scores 0 (released: the extracted answer then holds
    # the tags between the blocks); "last": the last block's answer counts.
    repeated_blocks: str = "zero"
    # "python": a line break between two tokens outside parentheses is a syntax error (released:
    # Python's `eval`); "space": a line break reads as a space.
    answer_newlines: str = "python"
    # True: `47.` reads as 47 (released: a Python float literal); False: it is rejected.
    trailing_dot: bool = True
    # True: also admit what the released code's character filter lets through although the
    # prompt does not allow it: `//`, `**` and decimals (`2.15` uses 2 and 15, `.5` uses 5).
    loopholes: bool = False


RULE_CHOICES = {
    "trailing_whitespace": ("newline", "any"),
    "repeated_blocks": ("zero", "last"),
    "answer_newlines": ("python", "space"),
}
RULE_NAMES = tuple(f.name for f in fields(CountdownRules))
RELEASED = CountdownRules()

DEFAULT_OPTIONS = {
    "format_score": 0.0,  # TinyZero gives 0.1 to a well-formed wrong answer; the paper's code 0
    # Text that opens the assistant's turn, after the chat template: TinyZero's Countdown
    # prompt ends "Let me solve this step by step.\n<think>" (TINYZERO_PREFIX); the paper's, with
    # "" (the default), opens nothing. The reward reads the prefix and the response as one turn.
    "response_prefix": "",
    "generator_seed": DEFAULT_GENERATOR_SEED,
    **{name: getattr(RELEASED, name) for name in RULE_NAMES},
}


def rules_from_options(options: Mapping[str, Any]) -> CountdownRules:
    """The CountdownRules named by task options; a bad value is a ValueError naming the option."""
    values = {}
    for name in RULE_NAMES:
        value = options.get(name, getattr(RELEASED, name))
        choices = RULE_CHOICES.get(name, (True, False))
        if isinstance(getattr(RELEASED, name), bool):
            ok = isinstance(value, bool)
        else:
            ok = value in choices
        if not ok:
            shown = " or ".join(str(c).lower() if isinstance(c, bool) else repr(c) for c in choices)
            raise ValueError(f"task 'countdown': {name} must be {shown}, got {value!r}")
        values[name] = value
    return CountdownRules(**values)


class _ParseError(Exception):
    pass


# ----------------------------------------------------------------------------- the answer


def _answer_end(response: str, rules: CountdownRules) -> int | None:
    """Where the final `</answer>` starts, or None when the response does not end with one."""
    if rules.trailing_whitespace == "newline":
        end = len(response) - 1 if response.endswith("\n") else len(response)
    else:
        end = len(response.rstrip())
    close = end - len("</answer>")
    return close if close >= 0 and response.startswith("</answer>", close) else None


_THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")


def _first_block_answer(text: str, close: int) -> str | None:
    """The released regex `<think>(.*?)</think>\\s*<answer>(.*?)</answer>$` (DOTALL, search), in
    linear time: from the first `<think>`, the first `</think>` that whitespace and `<answer>`
    follow; the answer runs from there to the final `</answer>`, tags and all. (The whole regex
    would retry from every `<think>`: quadratic on a response full of them.)"""
    start = text.find("<think>")
    if start < 0:
        return None
    found = _THINK_THEN_ANSWER.search(text, start + len("<think>"), close)
    return None if found is None else text[found.end() : close]


def _last_block_answer(text: str, close: int) -> str | None:
    """The last `<answer>...</answer>`, after `</think>` (and whitespace) of a think block."""
    open_at = text.rfind("<answer>", 0, close)
    if open_at < 0:
        return None
    before = text[:open_at].rstrip()
    if not before.endswith("</think>"):
        return None
    if before.rfind("<think>", 0, len(before) - len("</think>")) < 0:
        return None
    return text[open_at + len("<answer>") : close]


def extract_answer(response: str, rules: CountdownRules = RELEASED) -> str | None:
    """EXPR (stripped) when the response ends with <think>...</think> <answer>EXPR</answer>,
    read by `rules`, else None."""
    close = _answer_end(response, rules)
    if close is None:
        return None
    if rules.repeated_blocks == "zero":
        answer = _first_block_answer(response, close)
    else:
        answer = _last_block_answer(response, close)
    return None if answer is None else answer.strip()


# ----------------------------------------------------------------------------- the expression

_SPACES = " \t\x0c"  # what Python's tokenizer skips between tokens (besides line breaks)
_LINE_BREAKS = "\r\n"


def _number(expression: str, i: int, rules: CountdownRules) -> tuple[str, list[int], int]:
    """The numeric literal at `i`: (its text, its digit runs as integers, where it ends)."""
    n = len(expression)
    j = i
    while j < n and "0" <= expression[j] <= "9":
        j += 1
    whole = expression[i:j]
    if j < n and expression[j] == ".":
        k = j + 1
        while k < n and "0" <= expression[k] <= "9":
            k += 1
        fraction = expression[j + 1 : k]
        if fraction or not whole:
            if not rules.loopholes:
                raise _ParseError("a decimal")  # 2.15 from 2 and 15, .5 from 5
        elif not (rules.trailing_dot or rules.loopholes):
            raise _ParseError("a trailing '.'")
        return expression[i:k], [int(run) for run in (whole, fraction) if run], k
    if len(whole) > 1 and whole[0] == "0" and whole.strip("0"):
        raise _ParseError("leading zero")  # not a Python literal, so the released code scores 0
    return whole, [int(whole)], j


def tokenize(expression: str, rules: CountdownRules = RELEASED) -> tuple[list[str], list[int]]:
    """(tokens, the integers written in the expression, as the released code's `\\d+` reads
    them). Tokens are numeric literals and operators; anything the rules do not admit (unicode
    digits too) is a _ParseError."""
    if len(expression) > MAX_ANSWER_CHARS:
        raise _ParseError("answer too long")
    tokens: list[str] = []
    written: list[int] = []
    depth = 0
    line_break = False  # a line break outside parentheses after a token
    i, n = 0, len(expression)
    while i < n:
        char = expression[i]
        if char in _SPACES:
            i += 1
            continue
        if char in _LINE_BREAKS:
            if rules.answer_newlines == "python" and depth == 0 and tokens:
                line_break = True
            i += 1
            continue
        if line_break:
            raise _ParseError("a line break between tokens outside parentheses")
        if "0" <= char <= "9" or (char == "." and i + 1 < n and "0" <= expression[i + 1] <= "9"):
            literal, runs, i = _number(expression, i, rules)
            tokens.append(literal)
            written.extend(runs)
        elif char in "*/" and expression.startswith(char * 2, i):
            if not rules.loopholes:
                raise _ParseError(f"{char * 2!r}")
            tokens.append(char * 2)
            i += 2
        elif char in "+-*/()":
            depth = max(depth + {"(": 1, ")": -1}.get(char, 0), 0)
            tokens.append(char)
            i += 1
        else:
            raise _ParseError(f"character {char!r}")
        if len(tokens) > MAX_TOKENS:
            raise _ParseError("too many tokens")
    return tokens, written


def _width(value) -> int:
    if isinstance(value, int):
        return value.bit_length()
    if isinstance(value, Fraction):
        return max(value.numerator.bit_length(), value.denominator.bit_length())
    return 0  # floats and complex numbers have a fixed size


class _Parser:
    """Recursive descent over Python's grammar for these tokens:
    expr := term (+|- term)*; term := factor (*|/|// factor)*; factor := (+|-) factor | power;
    power := primary [** factor]; primary := NUMBER | ( expr ).

    The arithmetic is Python's on Python's numbers (int, float, complex: what the released
    code's `eval` computes), or exact rationals with `exact` (the solver). Depth is capped, and so
    is the width of an integer (only `**` and long products can build a wide one)."""

    def __init__(self, tokens: list[str], exact: bool = False):
        self.tokens = tokens
        self.exact = exact
        self.position = 0
        self.depth = 0

    def peek(self):
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self):
        token = self.peek()
        self.position += 1
        return token

    def descend(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ParseError("nested too deeply")

    def parse(self):
        value = self.expr()
        if self.position != len(self.tokens):
            raise _ParseError("trailing tokens")
        return value

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            if self.take() == "+":
                value = value + self.term()
            else:
                value = value - self.term()
        return value

    def term(self):
        value = self.factor()
        while self.peek() in ("*", "/", "//"):
            operator = self.take()
            right = self.factor()
            if operator == "*":
                if _width(value) + _width(right) > MAX_VALUE_BITS:
                    raise _ParseError("number too large")
                value = value * right
            elif operator == "/":
                value = value / right  # ZeroDivisionError, OverflowError: as in Python
            else:
                value = value // right
        return value

    def factor(self):
        if self.peek() in ("+", "-"):
            sign = self.take()
            self.descend()
            value = self.factor()
            self.depth -= 1
            return -value if sign == "-" else +value
        return self.power()

    def power(self):
        base = self.primary()
        if self.peek() != "**":
            return base
        self.take()
        self.descend()
        exponent = self.factor()
        self.depth -= 1
        # An integer to a positive integer power is an exact integer in Python: bound its width.
        # Every other case is a float or complex power of fixed cost.
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
            if _width(base) * exponent > MAX_VALUE_BITS:
                raise _ParseError("power too large")
        return base**exponent

    def primary(self):
        token = self.take()
        if token is None:
            raise _ParseError("unexpected end")
        if token[0].isdigit() or token[0] == ".":
            if self.exact:
                return Fraction(token)
            return float(token) if "." in token else int(token)
        if token == "(":
            self.descend()
            value = self.expr()
            if self.take() != ")":
                raise _ParseError("unbalanced parentheses")
            self.depth -= 1
            return value
        raise _ParseError(f"unexpected {token!r}")


_EVALUATION_ERRORS = (_ParseError, RecursionError, ZeroDivisionError, ValueError, OverflowError, TypeError)


def evaluate(expression: str, rules: CountdownRules = RELEASED):
    """The value the reward computes for an expression (Python's arithmetic, as the released
    code's), or None when `rules` do not admit it."""
    try:
        return _Parser(tokenize(expression, rules)[0]).parse()
    except _EVALUATION_ERRORS:
        return None


def exact_value(expression: str) -> Fraction | None:
    """The exact rational value of a + - * / expression (no loopholes), or None."""
    try:
        return _Parser(tokenize(expression, CountdownRules(loopholes=False))[0], exact=True).parse()
    except _EVALUATION_ERRORS:
        return None


def score(
    response: str,
    numbers: Sequence[int],
    target: int | float,
    format_score: float = 0.0,
    rules: CountdownRules = RELEASED,
) -> float:
    """1.0 for a correct final answer, `format_score` for a well-formed wrong one, else 0.0."""
    try:
        if not isinstance(response, str):
            return 0.0
        expression = extract_answer(response, rules)
        if expression is None:
            return 0.0
        try:
            tokens, written = tokenize(expression, rules)
        except _ParseError:
            return float(format_score)
        if sorted(written) != sorted(int(number) for number in numbers):
            return float(format_score)
        try:
            value = _Parser(tokens).parse()
            right = abs(value - target) < TOLERANCE
        except _EVALUATION_ERRORS:
            return float(format_score)
        return 1.0 if right else float(format_score)
    except Exception:  # a reward must never take a training step down
        return 0.0


# ----------------------------------------------------------------------------- solver, generator

def _key(value: float) -> float:
    # Values are rationals with small denominators; rounding merges the float noise of
    # different evaluation orders. Every answer is re-checked exactly, so a rare merge only
    # costs a missed solution, never a wrong one.
    return round(value, 9)


def _subset_tables(numbers: tuple[int, ...], include_full: bool = False) -> list[dict]:
    """For every proper subset (bitmask) of `numbers` (and the full set when asked):
    value key -> (value, recipe).

    A recipe is a leaf index or (operator, (left mask, left key), (right mask, right key)).
    """
    count = len(numbers)
    full = (1 << count) - 1
    tables: list[dict] = [dict() for _ in range(1 << count)]
    for index, number in enumerate(numbers):
        tables[1 << index][float(number)] = (float(number), index)
    for mask in range(1, full + 1 if include_full else full):
        if mask & (mask - 1) == 0:
            continue
        table = tables[mask]
        left = (mask - 1) & mask
        while left:
            right = mask ^ left
            if left > right:  # each unordered split once; both operand orders below
                for a_key, (a, _) in tables[left].items():
                    for b_key, (b, _) in tables[right].items():
                        a_ref, b_ref = (left, a_key), (right, b_key)
                        options = [
                            (a + b, ("+", a_ref, b_ref)),
                            (a * b, ("*", a_ref, b_ref)),
                            (a - b, ("-", a_ref, b_ref)),
                            (b - a, ("-", b_ref, a_ref)),
                        ]
                        if b != 0:
                            options.append((a / b, ("/", a_ref, b_ref)))
                        if a != 0:
                            options.append((b / a, ("/", b_ref, a_ref)))
                        for value, recipe in options:
                            table.setdefault(_key(value), (value, recipe))
            left = (left - 1) & mask
    return tables


def _expression(numbers, tables, mask: int, key: float) -> str:
    recipe = tables[mask][key][1]
    if isinstance(recipe, int):
        return str(numbers[recipe])
    return _join(numbers, tables, recipe)


def _join(numbers, tables, recipe) -> str:
    operator, (left_mask, left_key), (right_mask, right_key) = recipe
    parts = []
    for mask, key in ((left_mask, left_key), (right_mask, right_key)):
        text = _expression(numbers, tables, mask, key)
        parts.append(f"({text})" if mask & (mask - 1) else text)
    return f"{parts[0]} {operator} {parts[1]}"


def _fast_solve(numbers: tuple[int, ...], target: int) -> str | None:
    """Search by subset tables; the last operation is found by inverting it, not enumerating."""
    if len(numbers) == 1:
        return str(numbers[0]) if numbers[0] == target else None
    tables = _subset_tables(numbers)
    full = (1 << len(numbers)) - 1
    left = (full - 1) & full
    while left:
        right = full ^ left
        if left > right:
            for a_key, (a, _) in tables[left].items():
                a_ref = (left, a_key)
                # (needed right operand, recipe that would use it)
                wanted = [
                    (target - a, lambda b_ref: ("+", a_ref, b_ref)),
                    (a - target, lambda b_ref: ("-", a_ref, b_ref)),
                    (a + target, lambda b_ref: ("-", b_ref, a_ref)),
                    (target * a, lambda b_ref: ("/", b_ref, a_ref)),
                ]
                if a != 0:
                    wanted.append((target / a, lambda b_ref: ("*", a_ref, b_ref)))
                if target != 0:
                    wanted.append((a / target, lambda b_ref: ("/", a_ref, b_ref)))
                for needed, make in wanted:
                    b_key = _key(needed)
                    if b_key in tables[right]:
                        # The exact check also rejects a division by zero that the floats hid.
                        text = _join(numbers, tables, make((right, b_key)))
                        if exact_value(text) == target:
                            return text
        left = (left - 1) & full
    return None


def solve(nums: Sequence[int], target: int) -> str | None:
    """An expression using every number exactly once whose exact value is `target`, or None."""
    numbers = tuple(int(n) for n in nums)
    if not numbers or len(numbers) > 6:
        return None
    return _fast_solve(numbers, int(target))


def _in_split(nums: Sequence[int], target: int, split: str) -> bool:
    """A fixed assignment of every possible instance to train or test, so that the two
    generated streams are disjoint without either having to generate the other."""
    digest = hashlib.blake2b(repr((sorted(nums), target)).encode(), digest_size=2).digest()
    is_test = digest[0] < 64  # about a quarter of all instances are reserved for test
    return is_test == (split == "test")


def generate(n: int, seed: int, split: str | None = None) -> list[dict]:
    """`n` distinct solvable instances: 3 or 4 numbers in 1..99, a target in 10..100, a solution.

    Numbers are drawn uniformly, then the target uniformly among the integers in 10..100 that
    they can reach (drawing the target first wastes ~10 searches per instance: only ~9% of
    random (numbers, target) pairs are solvable). The stream for (seed, split) is fixed and
    prefix-stable: generate(n, s) is the start of generate(m, s) for m > n. With split "train"
    or "test" only instances of that side of a fixed partition are drawn, so the two never
    share an instance and neither needs the other to be generated.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    rng = random.Random(seed)
    seen: set = set()
    rows: list[dict] = []
    while len(rows) < n:
        nums = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        numbers = tuple(nums)
        tables = _subset_tables(numbers, include_full=True)
        full = tables[(1 << len(numbers)) - 1]
        targets = sorted(
            int(key)
            for key in full
            if 10 <= key <= 100
            and key == int(key)
            and (tuple(sorted(nums)), int(key)) not in seen
            and (split is None or _in_split(nums, int(key), split))
        )
        if not targets:
            continue
        target = rng.choice(targets)
        solution = _expression(numbers, tables, (1 << len(numbers)) - 1, float(target))
        if exact_value(solution) != target:  # float noise fooled the table: skip, never emit a wrong one
            continue
        seen.add((tuple(sorted(nums)), target))
        rows.append({"nums": nums, "target": target, "solution": solution})
    return rows


# ----------------------------------------------------------------------------- task


def normalize_example(row: Mapping[str, Any]) -> dict:
    if "nums" not in row or "target" not in row:
        raise ValueError(f"a countdown row needs 'nums' and 'target', got keys {sorted(row)}")
    example = {"nums": [int(x) for x in row["nums"]], "target": int(row["target"])}
    if row.get("solution"):
        example["solution"] = str(row["solution"])
    return example


class CountdownTask(Task):
    def __init__(self, **options):
        super().__init__(name="countdown", options=resolve_options("countdown", options, DEFAULT_OPTIONS))
        format_score = self.options["format_score"]
        if not isinstance(format_score, (int, float)) or not 0.0 <= format_score < 1.0:
            raise ValueError(f"task 'countdown': format_score must be in [0, 1), got {format_score!r}")
        if not isinstance(self.options["response_prefix"], str):
            raise ValueError(f"task 'countdown': response_prefix must be a string, got "
                             f"{self.options['response_prefix']!r}")
        self.rules = rules_from_options(self.options)

    def load(self, split: str, limit: int | None = None) -> list[dict]:
        seed = self.options["generator_seed"]
        rows = load_split_rows(
            self.options, split, limit, None, generator=lambda total: generate(total, seed, split)
        )
        return [normalize_example(row) for row in rows]

    def render(self, example: Mapping[str, Any], tokenizer) -> str:
        text = PROMPT.format(numbers=list(example["nums"]), target=example["target"])
        return render_user_prompt(text, tokenizer, self.options["template"]) + self.options["response_prefix"]

    def reward(self, response: str, example: Mapping[str, Any]) -> float:
        turn = self.options["response_prefix"] + response if isinstance(response, str) else response
        return score(turn, example["nums"], example["target"], self.options["format_score"], self.rules)
