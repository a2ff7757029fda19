"""The mechanism table: per (model, task, T) and variant, the end of each per-step
curve and the final eval score, over seeds, and where each range lies against Vanilla's.

`mechanism_table(records)` returns the numbers as plain data (a test can read the paper's claims
from it: "Ent's tail mass lies above Vanilla's range"); `render_mechanism_markdown` and
`render_mechanism_csv` write them as mechanism.md and mechanism.csv.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

from tre_cli import metrics as M
from tre_cli.losses.registry import BASE, baseline
from tre_cli.report.figures import shown_label, variant_order
from tre_cli.report.records import (
    NotEnoughData,
    RunRecord,
    Scale,
    _key_sort,
    _t_sort,
    csv_text,
    scale_for,
    task_label,
)
from tre_cli.tracking import model_label

LAST_STEPS = 5  # the curves' values are the mean over each seed's last 5 logged steps
EVAL = M.EVAL_SCORE  # the final (or best) eval score's key in an entry's values
TABLE_METRICS = (M.P_MAX, M.TAIL_MASS, M.TAIL_DRAWS, M.TAIL_DRAWS_PER_RESPONSE, M.ENTROPY, M.REWARD_MEAN, EVAL)
ABOVE, BELOW, OVERLAPS = "above", "below", "overlaps"
# A range is compared with Vanilla's only when both hold this many seeds: one seed is no range,
# and "above" would say no more than "greater".
MIN_SEEDS = 2


@dataclass(frozen=True)
class Range:
    """One quantity over seeds: the seeds' mean, minimum and maximum, and how many seeds had it."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Range | None:
        return cls(statistics.fmean(values), min(values), max(values), len(values)) if values else None

    def against(self, reference: Range) -> str:
        """'above' when this range lies entirely above the reference's, 'below' entirely below,
        else 'overlaps' (touching counts as overlapping)."""
        if self.low > reference.high:
            return ABOVE
        if self.high < reference.low:
            return BELOW
        return OVERLAPS


@dataclass(frozen=True)
class MechanismEntry:
    model: str
    task: str
    max_new_tokens: int | None
    method: str
    params: dict[str, Any]
    label: str  # "Ent (α=0.03)"
    seeds: tuple[int | None, ...]
    values: dict[str, Range | None]  # TABLE_METRICS key -> over seeds (None: not logged)
    # key -> ABOVE / BELOW / OVERLAPS against Vanilla's range at the same (model, task, T); empty
    # for Vanilla itself and where Vanilla did not run; a key missing on either side, or with fewer
    # than MIN_SEEDS seeds on either side, is left out.
    vs_baseline: dict[str, str]

    @property
    def n(self) -> int:
        return len(self.seeds)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): every Range as {mean, min, max, n}."""
        return {
            "model": self.model, "task": self.task, "max_new_tokens": self.max_new_tokens,
            "method": self.method, "params": dict(self.params), "label": self.label,
            "n": self.n, "seeds": list(self.seeds),
            "values": {
                k: None if v is None else {"mean": v.mean, "min": v.low, "max": v.high, "n": v.n}
                for k, v in self.values.items()
            },
            "vs_baseline": dict(self.vs_baseline),
        }


def last_mean(points: Sequence[tuple[int, float]], last: int = LAST_STEPS) -> float | None:
    """The mean of the last `last` logged values (by step); None without any."""
    values = [v for _, v in sorted(points)[-last:]]
    return statistics.fmean(values) if values else None


def mechanism_table(
    records: Sequence[RunRecord], score: str = "final", last: int = LAST_STEPS
) -> list[MechanismEntry]:
    """Per (model, task, T) and variant (method and parameters; Base left out), in report order:
    each curve of TABLE_METRICS as the seeds' mean of their last `last` logged steps, the eval
    score (`score`: final or best), each over seeds, and where each lies against Vanilla's range.

    Raises NotEnoughData when no run logged any of the curves."""
    trained = [r for r in records if r.method != BASE]
    curves = [k for k in TABLE_METRICS if k != EVAL]
    if not any(r.curve(k) for r in trained for k in curves):
        raise NotEnoughData(f"the mechanism table needs per-step logs of {', '.join(curves)}; no run has any")
    places = sorted(
        {(r.model, r.task, r.max_new_tokens) for r in trained},
        key=lambda p: (*_key_sort((p[0], p[1])), _t_sort(p[2])),
    )
    entries = []
    for place in places:
        here = [r for r in trained if (r.model, r.task, r.max_new_tokens) == place]
        rows = []
        for method, params in variant_order([(r.method, r.params) for r in here]):
            runs = sorted((r for r in here if (r.method, r.params) == (method, params)),
                          key=lambda r: (r.seed is None, r.seed or 0))
            values: dict[str, Range | None] = {}
            for key in TABLE_METRICS:
                if key == EVAL:
                    per_seed = [r.score(score) for r in runs]
                else:
                    per_seed = [last_mean(r.curve(key), last) for r in runs]
                values[key] = Range.of([v for v in per_seed if v is not None])
            rows.append((method, params, tuple(r.seed for r in runs), values))
        reference = next((values for method, _, _, values in rows if method == baseline().name), None)
        for method, params, seeds, values in rows:
            vs = {}
            if reference is not None and method != baseline().name:
                vs = {
                    k: v.against(reference[k])
                    for k, v in values.items()
                    if v is not None and reference.get(k) is not None and min(v.n, reference[k].n) >= MIN_SEEDS
                }
            entries.append(MechanismEntry(*place, method, dict(params), shown_label(method, dict(params)), seeds,
                                          values, vs))
    return entries


def find_entry(entries: Sequence[MechanismEntry], method: str, max_new_tokens: int | None = None,
               **params: Any) -> MechanismEntry:
    """The one entry of `method` (at T, with these parameters, where given); a KeyError naming the
    candidates otherwise."""
    found = [
        e for e in entries
        if e.method == method and (max_new_tokens is None or e.max_new_tokens == max_new_tokens)
        and all(e.params.get(k) == v for k, v in params.items())
    ]
    if len(found) != 1:
        raise KeyError(f"{len(found)} entries of {method} at T={max_new_tokens} {params}: "
                       + "; ".join(f"{e.label} T={e.max_new_tokens}" for e in entries))
    return found[0]


# --------------------------------------------------------------------------- rendering

SHORT = {
    M.P_MAX: "P_max", M.TAIL_MASS: "tail mass", M.TAIL_DRAWS: "tail draws (share)",
    M.TAIL_DRAWS_PER_RESPONSE: "tail draws / response", M.ENTROPY: "entropy", M.REWARD_MEAN: "reward", EVAL: "eval",
}
MARK = {ABOVE: "▲", BELOW: "▼", OVERLAPS: ""}


def _number(key: str, value: float, scale: Scale | None, extra: int = 0) -> str:
    """A value as the table shows it; `extra` more digits where two values must be told apart."""
    if key == EVAL and scale is not None:
        return f"{scale.show(value):.{scale.decimals + extra}f}"
    if key == M.TAIL_MASS:
        return f"{value:.{2 + extra}e}"
    return f"{value:.{3 + extra}f}"


def _extra_digits(key: str, value: Range, mark: str | None, reference: Range | None, scale: Scale | None) -> int:
    """0, or the digits a marked range needs for its edge and Vanilla's facing edge to differ in
    print: two ranges a hair apart are above or below, and the table must not show them equal."""
    if reference is None or mark not in (ABOVE, BELOW):
        return 0
    mine, theirs = (value.low, reference.high) if mark == ABOVE else (value.high, reference.low)
    extra = 0
    while extra < 6 and _number(key, mine, scale, extra) == _number(key, theirs, scale, extra):
        extra += 1
    return extra


def _scales(entries: Sequence[MechanismEntry], records: Sequence[RunRecord] = ()) -> dict[tuple[str, str], Scale]:
    out = {}
    for entry in entries:
        metrics = [r.eval_metric for r in records if r.model == entry.model and r.task == entry.task]
        out.setdefault((entry.model, entry.task), scale_for(entry.task, metrics))
    return out


def render_mechanism_markdown(entries: Sequence[MechanismEntry], records: Sequence[RunRecord] = (),
                              score: str = "final", last: int = LAST_STEPS) -> str:
    scales = _scales(entries, records)
    lines = []
    for model, task in dict.fromkeys((e.model, e.task) for e in entries):
        scale = scales[(model, task)]
        header = ["T", "variant", "n (seeds)", *(SHORT[k] if k != EVAL else scale.header for k in TABLE_METRICS)]
        align = ["---:", "---", "---"] + ["---:"] * len(TABLE_METRICS)
        lines += [f"### {model_label(model)} {task_label(task)}", "",
                  "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        here = [e for e in entries if (e.model, e.task) == (model, task)]
        references = {e.max_new_tokens: e for e in here if e.method == baseline().name}
        # Per T and column, the digits every row of that T shows (Vanilla's row included).
        extras: dict[tuple[int | None, str], int] = {}
        for entry in here:
            for key, mark in entry.vs_baseline.items():
                need = _extra_digits(key, entry.values[key], mark, references[entry.max_new_tokens].values[key], scale)
                extras[(entry.max_new_tokens, key)] = max(need, extras.get((entry.max_new_tokens, key), 0))
        for entry in here:
            cells = []
            for key in TABLE_METRICS:
                value = entry.values[key]
                if value is None:
                    cells.append("–")
                    continue
                mark = entry.vs_baseline.get(key)
                extra = extras.get((entry.max_new_tokens, key), 0)
                text = _number(key, value.mean, scale, extra)
                if value.n > 1:
                    text += f" [{_number(key, value.low, scale, extra)}, {_number(key, value.high, scale, extra)}]"
                cells.append(text + (f" {MARK[mark]}" if mark and MARK[mark] else ""))
            seeds = ", ".join(str(s) for s in entry.seeds)
            label = f"**{entry.label}**" if entry.method == baseline().name else entry.label
            lines.append(f"| {entry.max_new_tokens} | {label} | {entry.n} ({seeds}) | " + " | ".join(cells) + " |")
        lines.append("")
    what = "final eval score" if score == "final" else "best eval score"
    notes = [
        f"Each curve: every seed's mean over its last {last} logged steps (unsmoothed), then the mean over "
        "seeds and [min, max] over seeds; the eval column: the " + what + " over seeds, the same way.",
        f"▲ / ▼: the variant's [min, max] lies entirely above / below {baseline().display.short_label}'s at the same T "
        f"(no mark: the ranges overlap, or one side has fewer than {MIN_SEEDS} seeds: no range to compare).",
        "tail mass: the policy's mass outside its top-k tokens (metrics.tail_k); tail draws: responses holding a "
        "sampled token of probability below metrics.tail_p (share, and mean count per response).",
    ]
    head = "**The mechanism.** Per T and variant, the end of each per-step curve and the eval score, over seeds.\n\n"
    return head + "\n".join(lines) + "\n" + "".join(f"- {n}\n" for n in notes)


MECHANISM_CSV_COLUMNS = ("model", "task", "max_new_tokens", "method", "variant", "params", "n", "seeds", "metric",
                         "mean", "min", "max", "n_metric", "vs_vanilla")


def mechanism_rows(entries: Sequence[MechanismEntry]) -> list[list[Any]]:
    """Long form, raw units (eval as a fraction): one line per entry and metric."""
    out = []
    for e in entries:
        for key in TABLE_METRICS:
            value = e.values[key]
            out.append([
                e.model, e.task, e.max_new_tokens, e.method, e.label, json.dumps(e.params, sort_keys=True), e.n,
                " ".join(str(s) for s in e.seeds), key,
                *((None,) * 4 if value is None else (value.mean, value.low, value.high, value.n)),
                e.vs_baseline.get(key),
            ])
    return out


def render_mechanism_csv(entries: Sequence[MechanismEntry]) -> str:
    return csv_text(MECHANISM_CSV_COLUMNS, mechanism_rows(entries))


def claims(entries: Sequence[MechanismEntry]) -> Mapping[tuple[Any, ...], str]:
    """(model, task, T, label, metric) -> above / below / overlaps: every comparison in one map."""
    return {(e.model, e.task, e.max_new_tokens, e.label, k): v for e in entries for k, v in e.vs_baseline.items()}
