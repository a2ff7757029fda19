"""tre report's mechanism figure and table (issue 19): per-step curves read from the metrics, the
seeds' min-max band, the table's last-5-steps means and its above / below / overlaps against
Vanilla, the figure's panels and labels, and the one-line skips when a metric is missing.

Runs are written with tre_cli.tracking's Tracker (test_report.make_run), as training writes them.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import pytest

from test_report import make_run, records_of
from tre_cli import metrics as M
from tre_cli import report as rp


# --------------------------------------------------------------------------- the mechanism (issue 19)

MECHANISM_VARIANTS = {
    "vanilla": {}, "ent": {"alpha": 0.03}, "tre-k": {"k": 2, "alpha": 0.003}, "tre-p": {"p": 0.99, "alpha": 0.003},
}


def mechanism_curves(method: str, seed: int, steps: int = 8) -> dict[str, list[float]]:
    """Hand-made curves: Ent's tail mass and draws rise, TRE's P_max falls, the rest stays put;
    seeds 0, 1, 2 are offset by -1, 0, +1 units. The first steps carry a spike (step 1-3: 0.5 on
    every curve) that the last-5-steps mean must not see."""
    offset = seed - 1
    curves: dict[str, list[float]] = {}
    for key, base, unit in (
        (M.P_MAX, 0.90, 0.002), (M.TAIL_MASS, 1e-4, 1e-5), (M.TAIL_DRAWS, 0.05, 0.01),
        (M.TAIL_DRAWS_PER_RESPONSE, 0.06, 0.01), (M.ENTROPY, 0.2, 0.01), (M.REWARD_MEAN, 0.06, 0.01),
    ):
        value = base + offset * unit
        if method == "ent" and key in (M.TAIL_MASS, M.TAIL_DRAWS, M.TAIL_DRAWS_PER_RESPONSE):
            value += 10 * unit
        if method.startswith("tre") and key == M.P_MAX:
            value -= 10 * unit
        if method == "tre-p" and key == M.TAIL_MASS:  # partly above Vanilla's range: overlaps
            value += 1.5 * unit
        curves[key] = [0.5] * 3 + [value] * (steps - 3)
    return curves


@pytest.fixture(scope="module")
def mechanism_set(tmp_path_factory) -> Path:
    """The mechanism sweep in small: 4 variants x T 32, 64 x seeds 0, 1, 2 (testbed, Countdown)."""
    root = tmp_path_factory.mktemp("mechanism")
    for method, params in MECHANISM_VARIANTS.items():
        for t in (32, 64):
            for seed in range(3):
                score = 0.10 + seed / 100 - (0.02 * t / 32 if method == "ent" else 0.0)
                make_run(root, method, "countdown", seed, [score], model="testbed", max_new_tokens=t, params=params,
                         curves=mechanism_curves(method, seed))
    return root


def test_curves_are_read_from_the_metrics(tmp_path):
    make_run(tmp_path, "ent", "countdown", 0, [0.5], params={"alpha": 0.03}, curves={
        M.TAIL_MASS: [1e-4, math.nan, 3e-4], M.TAIL_DRAWS_PER_RESPONSE: [0.0, 0.5], M.P_MAX: [0.9, 0.8, 0.7],
    })
    [record] = records_of(tmp_path)
    assert record.curve(M.TAIL_MASS) == ((1, 1e-4), (3, 3e-4))  # a non-finite value is left out
    assert record.curve(M.TAIL_DRAWS_PER_RESPONSE) == ((1, 0.0), (2, 0.5))
    assert record.p_max == record.curve(M.P_MAX) == ((1, 0.9), (2, 0.8), (3, 0.7))
    assert record.curve(M.TAIL_DRAWS) == () and record.curve("actor/renamed") == ()
    assert (record.tail_k, record.tail_p) == (20, 1e-3)  # the run's metrics section


def test_seed_band_is_min_max_over_seeds(tmp_path):
    seeds = {0: [0.2, 0.4, 0.9], 1: [0.5, 0.1, 0.3], 2: [0.3, 0.3, 0.6]}
    for seed, values in seeds.items():
        make_run(tmp_path, "vanilla", "countdown", seed, [0.5], curves={M.TAIL_MASS: values})
    curve = rp.seed_curve("Vanilla", "red", records_of(tmp_path), 0.8, M.TAIL_MASS)
    smoothed = [rp.ema_smooth(v, 0.8) for v in seeds.values()]
    assert curve.n == 3 and curve.steps == (1, 2, 3)
    assert curve.low == pytest.approx([min(s[i] for s in smoothed) for i in range(3)])
    assert curve.high == pytest.approx([max(s[i] for s in smoothed) for i in range(3)])
    assert curve.mean == pytest.approx([statistics.fmean(s[i] for s in smoothed) for i in range(3)])
    assert rp.band_text([3, 3]) == "band: min-max over 3 seeds"
    assert rp.band_text([1, 1]) == "one seed per curve: no band" and rp.band_text([]) == ""


def test_range_against_a_reference():
    reference = rp.Range(0.5, 0.4, 0.6, 3)
    assert rp.Range(0.8, 0.7, 0.9, 3).against(reference) == rp.ABOVE
    assert rp.Range(0.2, 0.1, 0.3, 3).against(reference) == rp.BELOW
    assert rp.Range(0.65, 0.6, 0.7, 3).against(reference) == rp.OVERLAPS  # touching is not beyond
    assert rp.Range(0.5, 0.0, 1.0, 3).against(reference) == rp.OVERLAPS


def test_mechanism_table(mechanism_set):
    entries = rp.mechanism_table(records_of(mechanism_set))
    assert [(e.max_new_tokens, e.label) for e in entries][:4] == [
        (32, "Vanilla"), (32, "Ent (α=0.03)"), (32, "TRE-K (K=2, α=0.003)"), (32, "TRE-P (P=0.99, α=0.003)"),
    ]
    vanilla = rp.find_entry(entries, "vanilla", 64)
    assert vanilla.seeds == (0, 1, 2) and vanilla.vs_baseline == {}
    tail = vanilla.values[M.TAIL_MASS]  # the last 5 of 8 steps: the 0.5 spike of steps 1-3 left out
    assert (tail.mean, tail.low, tail.high, tail.n) == pytest.approx((1e-4, 0.9e-4, 1.1e-4, 3))
    ent = rp.find_entry(entries, "ent", 64)
    assert ent.values[M.TAIL_MASS].mean == pytest.approx(2e-4)
    assert ent.vs_baseline[M.TAIL_MASS] == ent.vs_baseline[M.TAIL_DRAWS_PER_RESPONSE] == "above"
    assert ent.vs_baseline[M.P_MAX] == "overlaps" and ent.vs_baseline[M.EVAL_SCORE] == "below"
    tre_k = rp.find_entry(entries, "tre-k", 32, k=2)
    assert tre_k.vs_baseline[M.P_MAX] == "below" and tre_k.vs_baseline[M.TAIL_MASS] == "overlaps"
    assert tre_k.vs_baseline[M.REWARD_MEAN] == "overlaps"
    assert rp.find_entry(entries, "tre-p", 32).vs_baseline[M.TAIL_MASS] == "overlaps"
    assert rp.claims(entries)[("testbed", "countdown", 64, "Ent (α=0.03)", M.TAIL_MASS)] == "above"
    plain = ent.as_dict()
    assert plain["values"][M.TAIL_MASS]["max"] == pytest.approx(2.1e-4) and plain["seeds"] == [0, 1, 2]
    assert plain["params"] == {"alpha": 0.03} and plain["vs_baseline"][M.TAIL_MASS] == "above"
    with pytest.raises(KeyError, match="0 entries of tre-k"):
        rp.find_entry(entries, "tre-k", 32, k=5)
    one_seed = [r for r in records_of(mechanism_set) if r.seed == 0]
    assert rp.find_entry(rp.mechanism_table(one_seed), "ent", 64).vs_baseline == {}  # no range: no claim


def test_mechanism_table_files(mechanism_set, tmp_path):
    report = rp.write_report(rp.load_local_runs([mechanism_set]), tmp_path / "out")
    assert [line.split(":")[0] for line in report.skipped] == ["fig4_hparam"]
    md = (tmp_path / "out" / "mechanism.md").read_text()
    ent_row = next(line for line in md.splitlines() if line.startswith("| 64 | Ent (α=0.03)"))
    assert "| 3 (0, 1, 2) |" in ent_row and "2.00e-04 [1.90e-04, 2.10e-04] ▲" in ent_row
    assert "7.00 [6.00, 8.00] ▼" in ent_row  # pass@1 in percent: 6-8, below Vanilla's 10-12
    assert "last 5 logged steps" in md and "entirely above / below Vanilla's" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "mechanism.csv").read_text())))
    assert len(rows) == 8 * len(rp.TABLE_METRICS)
    ent_tail = next(
        r for r in rows if r["method"] == "ent" and r["max_new_tokens"] == "64" and r["metric"] == M.TAIL_MASS
    )
    assert float(ent_tail["mean"]) == pytest.approx(2e-4) and ent_tail["vs_vanilla"] == "above"
    assert ent_tail["seeds"] == "0 1 2" and ent_tail["variant"] == "Ent (α=0.03)"
    tables, _ = rp.wandb_payload(report)
    assert len(tables["mechanism"][1]) == len(rows)


def test_mechanism_figure(mechanism_set):
    data = rp.mechanism_data(records_of(mechanism_set))
    assert [(row.task, row.max_new_tokens) for row in data.rows] == [("countdown", 32), ("countdown", 64)]
    assert data.metrics == (M.P_MAX, M.TAIL_MASS, M.TAIL_DRAWS_PER_RESPONSE) and data.missing == ()
    key, curves = data.rows[1].panels[1]
    assert key == M.TAIL_MASS
    assert [c.label for c in curves] == ["Vanilla", "Ent (α=0.03)", "TRE-K (K=2, α=0.003)", "TRE-P (P=0.99, α=0.003)"]
    assert all(c.n == 3 for c in curves) and len({c.color for c in curves}) == 4
    assert len({c.marker for c in curves}) == 4  # lines that coincide still read as two
    fig = rp.plot_mechanism(data)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 6
    titles = [ax.get_title() for ax in axes]
    assert titles[:3] == [
        "Countdown, T=32: P_max", "Countdown, T=32: tail mass", "Countdown, T=32: tail draws per response"
    ]
    assert axes[1].get_yscale() == "log" and axes[0].get_yscale() == axes[2].get_yscale() == "linear"
    assert axes[1].get_ylabel() == "tail mass (outside the top 20 tokens)"
    assert axes[2].get_ylabel() == "tail draws per response (p < 0.001)"
    assert all(len(ax.collections) == 4 for ax in axes)  # a band per variant
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [c.label for c in curves]
    caption = fig._suptitle.get_text()
    assert "band: min-max over 3 seeds" in caption and "EMA-smoothed (0.8)" in caption


def test_mechanism_figure_with_a_metric_missing(tmp_path):
    for method in ("vanilla", "ent"):
        for seed in range(2):
            make_run(tmp_path, method, "countdown", seed, [0.1], p_max=[0.9, 0.91],
                     curves={M.TAIL_MASS: [1e-4, 2e-4 if method == "ent" else 1e-4]})
    data = rp.mechanism_data(records_of(tmp_path))
    assert data.metrics == (M.P_MAX, M.TAIL_MASS) and data.missing == (M.TAIL_DRAWS_PER_RESPONSE,)
    fig = rp.plot_mechanism(data)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    assert axes[1].get_yscale() == "linear"  # 1e-4..2e-4: within a factor 5, a log axis would have no labels
    assert "not logged by these runs: rollout/tail_draws_per_response" in fig._suptitle.get_text()
    assert "band: min-max over 2 seeds" in fig._suptitle.get_text()


def test_mechanism_figure_and_table_need_their_metrics(tmp_path):
    make_run(tmp_path, "vanilla", "countdown", 0, [0.5], p_max=[0.9, 0.9])
    make_run(tmp_path, "ent", "countdown", 0, [0.5], p_max=[0.9, 0.9], params={"alpha": 0.03})
    records = records_of(tmp_path)
    with pytest.raises(rp.NotEnoughData, match="actor/tail_mass or rollout/tail_draws_per_response") as reason:
        rp.mechanism_data(records)
    assert len(str(reason.value).splitlines()) == 1
    with pytest.raises(rp.NotEnoughData, match="older runs did not write them"):
        rp.mechanism_data(records, metrics=(M.P_MAX, "actor/renamed_tail"))
    only_one = tmp_path / "one"
    make_run(only_one, "vanilla", "countdown", 0, [0.5], curves={M.TAIL_MASS: [1e-4]})
    with pytest.raises(rp.NotEnoughData, match="two or more variants"):
        rp.mechanism_data(records_of(only_one))
    bare = tmp_path / "bare"
    make_run(bare, "vanilla", "countdown", 0, [0.5])
    with pytest.raises(rp.NotEnoughData, match="needs per-step logs"):
        rp.mechanism_table(records_of(bare))


def _record(method: str, seed: int, entropy: float, params=()) -> rp.RunRecord:
    return rp.RunRecord(
        source=f"{method}-{seed}", model="testbed", task="countdown", method=method, params=params,
        max_new_tokens=64, seed=seed, status="finished", final_eval=0.1, best_eval=0.1, eval_metric="pass@1",
        curves=((M.ENTROPY, ((1, entropy),)),),
    )


def test_mechanism_markdown_shows_the_digits_a_mark_needs():
    """Ranges a hair apart are 'above'; the table prints enough digits (in Vanilla's row too) that
    they do not read as equal."""
    records = [_record("vanilla", 0, 0.15160), _record("vanilla", 1, 0.15162)]
    records += [_record("ent", s, v, (("alpha", 0.03),)) for s, v in ((0, 0.15178), (1, 0.15180))]
    entries = rp.mechanism_table(records)
    assert rp.find_entry(entries, "ent").vs_baseline[M.ENTROPY] == "above"
    md = rp.render_mechanism_markdown(entries)
    cells = [line.split("|") for line in md.splitlines() if line.startswith("| 64")]
    rows = {cell[2].strip(): cell[8].strip() for cell in cells}  # column 8: entropy
    assert rows["**Vanilla**"] == "0.1516 [0.1516, 0.1516]"
    assert rows["Ent (α=0.03)"] == "0.1518 [0.1518, 0.1518] ▲"
