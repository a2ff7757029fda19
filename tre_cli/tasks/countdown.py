"""Countdown: reach a target with + - * / using each given number exactly once.

The reward follows the rule of the paper's released code: the response must end with
`<think>...</think>` then `<answer>EXPR</answer>`; the integers in EXPR must equal the given
numbers as a multiset; EXPR may hold only integer literals, + - * /, parentheses and unary minus;
its exact rational value must be within 1e-5 of the target. The expression is evaluated by the
small parser below, never by `eval`, and every input (any size, any nesting, any characters)
returns a float in time linear in its length.

The generator and solver let Countdown run with no download at all.
"""

from __future__ import annotations

import hashlib
import random
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

TOLERANCE = Fraction(1, 100_000)
# Limits that keep scoring linear and bounded whatever the model writes. A valid answer uses at
# most 4 numbers, so these are far above anything a correct expression needs.
MAX_ANSWER_CHARS = 2_000
MAX_TOKENS = 400
MAX_DEPTH = 100

DEFAULT_GENERATOR_SEED = 20_250_101
DEFAULT_OPTIONS = {
    "format_score": 0.0,  # TinyZero gives 0.1 to a well-formed wrong answer; the paper's code 0
    "generator_seed": DEFAULT_GENERATOR_SEED,
}


class _ParseError(Exception):
    pass


def extract_answer(response: str) -> str | None:
    """EXPR when the response ends with <think>...</think> <answer>EXPR</answer>, else None."""
    text = response.rstrip()
    if not text.endswith("</answer>"):
        return None
    open_at = text.rfind("<answer>")
    if open_at < 0:
        return None
    before = text[:open_at].rstrip()
    if not before.endswith("</think>"):
        return None
    if before.rfind("<think>", 0, len(before) - len("</think>")) < 0:
        return None
    return text[open_at + len("<answer>") : len(text) - len("</answer>")]


def tokenize(expression: str) -> list:
    """Integers and single-character operators; anything else (unicode digits too) is an error."""
    if len(expression) > MAX_ANSWER_CHARS:
        raise _ParseError("answer too long")
    tokens: list = []
    i, n = 0, len(expression)
    while i < n:
        char = expression[i]
        if char in " \t\r\n":
            i += 1
        elif "0" <= char <= "9":
            j = i
            while j < n and "0" <= expression[j] <= "9":
                j += 1
            literal = expression[i:j]
            if j - i > 9:
                raise _ParseError("number too long")  # no given number has more than 2 digits
            if len(literal) > 1 and literal[0] == "0":
                raise _ParseError("leading zero")  # not a Python literal, so the released code scores 0
            tokens.append(int(literal))
            i = j
        elif char in "+-*/()":
            tokens.append(char)
            i += 1
        else:
            raise _ParseError(f"character {char!r}")
        if len(tokens) > MAX_TOKENS:
            raise _ParseError("too many tokens")
    return tokens


class _Parser:
    """Recursive descent over: expr := term (+|- term)*; term := unary (*|/ unary)*;
    unary := - unary | primary; primary := INT | ( expr ). Depth is capped."""

    def __init__(self, tokens: list):
        self.tokens = tokens
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

    def parse(self) -> Fraction:
        value = self.expr()
        if self.position != len(self.tokens):
            raise _ParseError("trailing tokens")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            if self.take() == "+":
                value = value + self.term()
            else:
                value = value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            operator = self.take()
            right = self.unary()
            if operator == "*":
                value = value * right
            elif right == 0:
                raise _ParseError("division by zero")
            else:
                value = value / right
        return value

    def unary(self) -> Fraction:
        if self.peek() == "-":
            self.take()
            self.descend()
            value = -self.unary()
            self.depth -= 1
            return value
        return self.primary()

    def primary(self) -> Fraction:
        token = self.take()
        if isinstance(token, int):
            return Fraction(token)
        if token == "(":
            self.descend()
            value = self.expr()
            if self.take() != ")":
                raise _ParseError("unbalanced parentheses")
            self.depth -= 1
            return value
        raise _ParseError(f"unexpected {token!r}")


def evaluate(expression: str) -> Fraction | None:
    """The exact value of an arithmetic expression, or None when it is not one we admit."""
    try:
        return _Parser(tokenize(expression)).parse()
    except (_ParseError, RecursionError, ZeroDivisionError, ValueError, OverflowError):
        return None


def score(response: str, numbers: Sequence[int], target: int | float, format_score: float = 0.0) -> float:
    """1.0 for a correct final answer, `format_score` for a well-formed wrong one, else 0.0."""
    try:
        if not isinstance(response, str):
            return 0.0
        expression = extract_answer(response)
        if expression is None:
            return 0.0
        try:
            tokens = tokenize(expression)
        except _ParseError:
            return float(format_score)
        used = sorted(token for token in tokens if isinstance(token, int))
        if used != sorted(int(number) for number in numbers):
            return float(format_score)
        try:
            value = _Parser(tokens).parse()
        except (_ParseError, RecursionError, ZeroDivisionError):
            return float(format_score)
        if abs(value - Fraction(target)) < TOLERANCE:
            return 1.0
        return float(format_score)
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
                        if evaluate(text) == target:
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
        if evaluate(solution) != target:  # float noise fooled the table: skip, never emit a wrong one
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

    def load(self, split: str, limit: int | None = None) -> list[dict]:
        seed = self.options["generator_seed"]
        rows = load_split_rows(
            self.options, split, limit, None, generator=lambda total: generate(total, seed, split)
        )
        return [normalize_example(row) for row in rows]

    def render(self, example: Mapping[str, Any], tokenizer) -> str:
        text = PROMPT.format(numbers=list(example["nums"]), target=example["target"])
        return render_user_prompt(text, tokenizer, self.options["template"])

    def reward(self, response: str, example: Mapping[str, Any]) -> float:
        return score(response, example["nums"], example["target"], self.options["format_score"])
