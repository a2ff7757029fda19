"""MATH (Hendrycks et al.): the last \\boxed{...} of the response against the reference answer.

The judge is the rule-based one of the paper's released code (verl 0.4.0's `math` reward, itself
lm-eval's `hendrycks_math`): extract the last boxed expression, normalise both sides with the
`strip_string` rules, and compare strings. When a normalisation step fails on odd input those
rules fall back to comparing the raw strings; so do we. The rules are re-implemented here in
linear time so that a 10 MB response costs milliseconds, not seconds. Where the released code,
lm-eval and the paper's text read an edge case differently (`\\fbox`, a space-form `\\boxed X`,
an `a/b` that is not two integers), `MathRules` names the reading, one task option each; the
defaults are the released code's (README, "Reward rules at the edges").

`verifier: math_verify` adds symbolic equivalence through the `math-verify` package (an extra),
run in a child process with a timeout so that it is safe in worker threads (math-verify's own
timeout uses SIGALRM, which only works in the main thread).
"""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass, fields
from typing import Any, Mapping

from tre_cli.tasks.base import Task, load_split_rows, render_user_prompt, resolve_options

PROMPT = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."
DEFAULT_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
# No reference answer in MATH is longer than ~150 characters; a longer boxed span is wrong.
MAX_BOXED_CHARS = 10_000


@dataclass(frozen=True)
class MathRules:
    """How the judge reads the edge cases; each field is a task option of the same name. The
    defaults are the released code's."""

    # False: `\\fbox{A}` pays nothing (released and lm-eval: their extraction finds it but only
    # strips `\\boxed`, and fails); True: the last `\\boxed{}` or `\\fbox{}` counts (the paper's
    # "also \\fbox" reading).
    fbox: bool = False
    # True: a space-form `\\boxed X` anywhere wins over a later `\\boxed{A}` (released and
    # lm-eval: they look for "\\boxed " first); False: the last box counts, whichever its form.
    space_boxed_first: bool = True
    # "normalize": an `a/b` that is not two integers (`12^{1/7}`) stays as written and the
    # comparison is of the normalised strings (released: verl 0.4.0 catches every error there);
    # "raw": the raw strings are compared instead (lm-eval: only an AssertionError is caught).
    slash_fallback: str = "normalize"


RELEASED = MathRules()
RULE_NAMES = tuple(f.name for f in fields(MathRules))
SLASH_FALLBACKS = ("normalize", "raw")

DEFAULT_OPTIONS = {
    "verifier": "exact",  # exact: the lm-eval string rules; math_verify: also symbolic equivalence
    "verify_timeout_s": 5.0,
    "reference": "solution",  # where the reference answer comes from: solution (boxed) or answer
    **{name: getattr(RELEASED, name) for name in RULE_NAMES},
}
REFERENCES = ("solution", "answer")
VERIFIERS = ("exact", "math_verify")


def rules_from_options(options: Mapping[str, Any]) -> MathRules:
    """The MathRules named by task options; a bad value is a ValueError naming the option."""
    for name in ("fbox", "space_boxed_first"):
        if not isinstance(options.get(name, getattr(RELEASED, name)), bool):
            raise ValueError(f"task 'math': {name} must be true or false, got {options[name]!r}")
    fallback = options.get("slash_fallback", RELEASED.slash_fallback)
    if fallback not in SLASH_FALLBACKS:
        raise ValueError(f"task 'math': slash_fallback must be 'normalize' or 'raw', got {fallback!r}")
    return MathRules(**{name: options.get(name, getattr(RELEASED, name)) for name in RULE_NAMES})


class _NormalizeError(Exception):
    pass


def last_boxed(text: str, rules: MathRules = RELEASED) -> str | None:
    """Contents of the last \\boxed{...} (braces balanced) or `\\boxed X` (up to the next $),
    read by `rules` (\\fbox{...} too when they say so), or None."""
    if rules.space_boxed_first:
        at = text.rfind("\\boxed ")
        if at >= 0:  # the released code takes this form first, wherever it is
            return _space_form(text, at + len("\\boxed "))
    start = text.rfind("\\boxed")
    if rules.fbox:
        start = max(start, text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    if text.startswith(" ", i):
        return _space_form(text, i + 1)
    if not text.startswith("{", i):
        return None
    depth = 0
    limit = min(len(text), i + MAX_BOXED_CHARS + 2)
    for j in range(i, limit):
        char = text[j]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _space_form(text: str, i: int) -> str | None:
    """`\\boxed X`: X runs from `i` to the next $ (or the end), as in lm-eval and verl."""
    end = text.find("$", i)
    content = text[i : end if end >= 0 else len(text)]
    return content if len(content) <= MAX_BOXED_CHARS else None


def _fix_fracs(string: str) -> str:
    parts = string.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        out.append("\\frac")
        if part[:1] == "{":
            out.append(part)
            continue
        if not part:
            raise _NormalizeError("\\frac at the end")  # released and lm-eval: IndexError, raw compare
        if len(part) < 2:
            return string  # released and lm-eval: the input unchanged, normalisation goes on
        a, b, rest = part[0], part[1], part[2:]
        if b != "{":
            out.append("{" + a + "}{" + b + "}" + rest)
        else:
            out.append("{" + a + "}" + b + rest)
    return "".join(out)


def _fix_a_slash_b(string: str, fallback: str = "normalize") -> str:
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        if fallback == "raw":
            raise _NormalizeError("a/b with non-integers") from None  # lm-eval: uncaught -> raw compare
        return string  # verl 0.4.0 (released): every error caught, the string unchanged
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        parts = string.split("\\text{ ")
        if len(parts) != 2:
            raise _NormalizeError("several \\text{ ")
        return parts[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    parts = string.split("\\sqrt")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise _NormalizeError("trailing \\sqrt")
        if part[0] != "{":
            out.append("\\sqrt{" + part[0] + "}" + part[1:])
        else:
            out.append("\\sqrt" + part)
    return "".join(out)


def strip_string(string: str, slash_fallback: str = "normalize") -> str:
    """The Hendrycks MATH normalisation (verl / lm-eval `strip_string`); raises _NormalizeError
    where the original would raise."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")  # lm-eval's second replace ("\%" unescaped) is the same
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    halves = string.split("=")
    if len(halves) == 2 and len(halves[0]) <= 2:
        string = halves[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string, slash_fallback)


def is_equiv(candidate: str | None, reference: str | None, rules: MathRules = RELEASED) -> bool:
    if candidate is None or reference is None:
        return False
    try:
        return strip_string(candidate, rules.slash_fallback) == strip_string(reference, rules.slash_fallback)
    except _NormalizeError:
        return candidate == reference


# A reference solution's own box: the last one of either kind. On MATH's 12,500 solutions this
# and the released reading differ once: a train solution whose first box is `\\boxed {17}.`,
# where the released preprocessing takes "{17}." as the reference (no response can match it).
REFERENCE_BOX = MathRules(fbox=True, space_boxed_first=False)


def reference_answer(example: Mapping[str, Any], prefer: str = "solution") -> str | None:
    """The reference answer: the last boxed expression of the worked solution (`prefer`
    "solution", as in the paper's pipeline, whose data has no answer field) or the `answer`
    field (`prefer` "answer"); either falls back to the other when missing or empty.

    Why the solution first: some published layouts of MATH ship an `answer` field that was
    normalised lossily (`\\text{(C)}` -> `{(C)}`, matrix rows merged), which no natural
    response can match under the lm-eval rules.
    """
    answer = example.get("answer")
    answer = str(answer) if answer is not None and str(answer) != "" else None
    solution = example.get("solution")
    boxed = last_boxed(str(solution), REFERENCE_BOX) if solution else None
    if prefer == "answer":
        return answer if answer is not None else boxed
    return boxed if boxed is not None else answer


def score(response: str, answer: str, rules: MathRules = RELEASED) -> float:
    """1.0 when the last boxed expression of `response` matches `answer` after normalisation."""
    try:
        if not isinstance(response, str) or answer is None:
            return 0.0
        return 1.0 if is_equiv(last_boxed(response, rules), str(answer), rules) else 0.0
    except Exception:  # a reward must never take a training step down
        return 0.0


# ----------------------------------------------------------------------------- math-verify


def _math_verify_worker(connection) -> None:
    # A child process of its own: math-verify may hang on adversarial LaTeX, and the parent
    # kills us then. Timeouts inside are off because SIGALRM is not ours to rely on.
    import logging

    from math_verify import parse, verify

    # It warns on every call that its own timeout is off; the parent process is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    while True:
        request = connection.recv()
        if request is None:
            return
        response, answer = request
        try:
            gold = parse("$" + answer + "$", parsing_timeout=None)
            predicted = parse(response, parsing_timeout=None)
            connection.send(bool(verify(gold, predicted, timeout_seconds=None)))
        except Exception:
            connection.send(False)


class MathVerifier:
    """Symbolic equivalence through math-verify in a child process, with a per-call timeout."""

    def __init__(self, timeout_s: float = 5.0):
        try:
            import math_verify  # noqa: F401  (fail here, with a clear line, not in the child)
        except ImportError:
            raise ValueError("verifier 'math_verify' needs the math-verify package: pip install 'tre-cli[math]'") from None
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._process = None
        self._connection = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_math_verify_worker, args=(child,), daemon=True)
        self._process.start()
        self._connection = parent

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self._process = None
        self._connection = None

    def equivalent(self, response: str, answer: str) -> bool:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            try:
                self._connection.send((response[-MAX_BOXED_CHARS * 10 :], answer))
                if self._connection.poll(self.timeout_s):
                    return bool(self._connection.recv())
            except (EOFError, OSError):
                pass
            self._stop()  # timed out or died: a fresh worker next time
            return False

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                try:
                    self._connection.send(None)
                except OSError:
                    pass
            self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass


# ----------------------------------------------------------------------------- task


def normalize_example(row: Mapping[str, Any], prefer: str = "solution") -> dict:
    if "problem" not in row:
        raise ValueError(f"a MATH row needs 'problem', got keys {sorted(row)}")
    answer = reference_answer(row, prefer)
    if answer is None:
        raise ValueError("a MATH row needs 'answer' or a 'solution' with a \\boxed{} answer")
    example = {"problem": str(row["problem"]), "answer": answer}
    if row.get("solution"):
        example["solution"] = str(row["solution"])
    return example


class MathTask(Task):
    def __init__(self, **options):
        super().__init__(name="math", options=resolve_options("math", options, DEFAULT_OPTIONS))
        if self.options["verifier"] not in VERIFIERS:
            raise ValueError(f"task 'math': verifier must be one of {', '.join(VERIFIERS)}, got {self.options['verifier']!r}")
        if self.options["reference"] not in REFERENCES:
            raise ValueError(f"task 'math': reference must be one of {', '.join(REFERENCES)}, got {self.options['reference']!r}")
        self.rules = rules_from_options(self.options)
        self._verifier = MathVerifier(self.options["verify_timeout_s"]) if self.options["verifier"] == "math_verify" else None

    def load(self, split: str, limit: int | None = None) -> list[dict]:
        rows = load_split_rows(self.options, split, limit, DEFAULT_SOURCE)
        return [normalize_example(row, self.options["reference"]) for row in rows]

    def render(self, example: Mapping[str, Any], tokenizer) -> str:
        return render_user_prompt(PROMPT.format(problem=example["problem"]), tokenizer, self.options["template"])

    def reward(self, response: str, example: Mapping[str, Any]) -> float:
        # A loaded example already carries its reference in `answer`.
        answer = example.get("answer") or reference_answer(example, self.options["reference"])
        exact = score(response, answer, self.rules)
        if exact == 1.0 or self._verifier is None or not isinstance(response, str) or answer is None:
            return exact
        return 1.0 if self._verifier.equivalent(response, answer) else 0.0
