"""tre report: Table 1 (numbers, marks, files), EMA smoothing, Figures 1/3/4, the mechanism figure
and table, skips, errors, the CLI.

Runs are written with tre_cli.tracking's own writers (Tracker, create_run_dir, append_result), so the
report reads exactly what training writes.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from collections.abc import Mapping, Sequence

import pytest
from typer.testing import CliRunner

from tre_cli import metrics as M
from tre_cli import report as rp
from tre_cli.cli import app
from tre_cli.config import from_dict, to_dict
from tre_cli.tracking import Tracker, wandb_run_to_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QWEN = "Qwen/Qwen2.5-1.5B-Instruct"


def make_run(
    root: Path,
    method: str,
    task: str,
    seed: int,
    scores: Sequence[float],
    *,
    model: str = QWEN,
    max_new_tokens: int = 512,
    params: dict | None = None,
    p_max: Sequence[float] = (),
    metric: str = "pass@1",
    name: str | None = None,
    status: str = "finished",
    curves: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One run directory under root (its store: root/results.jsonl), written by Tracker.

    scores are eval scores at steps 1..len(scores) (the last is final_eval); p_max is logged at
    steps 1..len(p_max) (with reward/mean 0.5), each of `curves` (metric key -> values) at steps
    1..len(values)."""
    cfg = from_dict({
        "model": {"name": model},
        "task": {"name": task},
        "method": {"name": method, **(params or {})},
        "rollout": {"max_new_tokens": max_new_tokens},
        "run": {"seed": seed, "wandb": {"mode": "disabled"}},
    })
    label = "-".join(f"{k}{v}" for k, v in sorted((params or {}).items()))
    run_dir = root / (name or f"{model.rsplit('/', 1)[-1]}-{task}-T{max_new_tokens}-{method}{label}-s{seed}")
    curves = dict(curves or {})
    with Tracker(cfg, run_dir) as tracker:
        for step in range(1, max(len(scores), len(p_max), *map(len, curves.values()), 0) + 1):
            logged = {M.P_MAX: p_max[step - 1], M.REWARD_MEAN: 0.5} if step <= len(p_max) else {}
            logged.update({key: values[step - 1] for key, values in curves.items() if step <= len(values)})
            if logged:
                tracker.log(logged, step=step)
            if step <= len(scores):
                tracker.log_eval(step=step, score=scores[step - 1], metric=metric, n_prompts=8, n_samples=2)
        if status != "finished":
            tracker.finish(status)
    return run_dir


def make_base(
    root: Path,
    task: str,
    score: float,
    *,
    model: str = QWEN,
    max_new_tokens: int = 512,
    metric: str = "pass@1",
    method: str = "tre-p",
) -> Path:
    """What `tre eval` of the untrained model records: a step-0 evaluation, a result labelled "base"."""
    cfg = from_dict({
        "model": {"name": model},
        "task": {"name": task},
        "method": {"name": method},
        "rollout": {"max_new_tokens": max_new_tokens},
        "run": {"wandb": {"mode": "disabled"}},
    })
    run_dir = root / f"{model.rsplit('/', 1)[-1]}-{task}-base-{method}"
    with Tracker(cfg, run_dir) as tracker:
        tracker.log_eval(step=0, score=score, metric=metric, n_prompts=8, n_samples=2)
        tracker.finish("finished", steps_done=0, method="base")
    return run_dir


def records_of(root: Path, score: str = "final"):
    records, _ = rp.usable_records(rp.load_local_runs([root]), score)
    return records


# --------------------------------------------------------------------------- a hand-made Table 1


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """Countdown (pass@1) and HH (reward) with hand-picked scores:

    countdown: vanilla 0.60 0.62 0.64 (mean 62.00, std 2.00); ent 0.61 0.63 (mean 62.00, [61, 63]);
               tre-k K=2 0.66 (66.00); tre-p P=0.99 0.70 0.66 0.68 (68.00 ± 2.00); base 0.05;
               tre-k K=5 0.50 (not the main variant: not in Table 1).
    hh: vanilla 3.0, tre-p 3.5, kl-cov 3.5 (a tie for best), ent 2.0.
    """
    root = tmp_path_factory.mktemp("small")
    for seed, score in enumerate((0.60, 0.62, 0.64)):
        make_run(root, "vanilla", "countdown", seed, [0.1, score], p_max=[0.5, 0.6, 0.7])
    for seed, score in enumerate((0.61, 0.63)):
        make_run(root, "ent", "countdown", seed, [0.9, score])  # best 0.9 != final
    make_run(root, "tre-k", "countdown", 0, [0.66], p_max=[0.5, 0.55])
    make_run(root, "tre-k", "countdown", 0, [0.50], params={"k": 5})
    for seed, score in enumerate((0.70, 0.66, 0.68)):
        make_run(root, "tre-p", "countdown", seed, [score], p_max=[0.5, 0.52, 0.51])
    make_base(root, "countdown", 0.05)
    make_run(root, "vanilla", "hh", 0, [3.0], metric="reward", max_new_tokens=1024)
    make_run(root, "tre-p", "hh", 0, [3.5], metric="reward", max_new_tokens=1024)
    make_run(root, "kl-cov", "hh", 0, [3.5], metric="reward", max_new_tokens=1024)
    make_run(root, "ent", "hh", 0, [2.0], metric="reward", max_new_tokens=1024)
    return root


def _cells(table: rp.Table1):
    return {
        (row.method, column.task): tc
        for row in table.rows
        for column, tc in zip(table.columns, row.cells)
        if tc is not None
    }


def test_table1_means_spreads_deltas_and_marks(small_set):
    table = rp.build_table1(records_of(small_set))
    assert [(c.task, c.max_new_tokens, c.scale.factor) for c in table.columns] == [
        ("countdown", 512, 100.0),
        ("hh", 1024, 1.0),
    ]
    assert [row.method for row in table.rows] == ["base", "vanilla", "ent", "kl-cov", "tre-k", "tre-p"]
    cells = _cells(table)

    vanilla = cells[("vanilla", "countdown")]
    assert vanilla.cell.n == 3 and vanilla.cell.mean == pytest.approx(0.62)
    assert vanilla.cell.spread_kind == "std" and vanilla.cell.std == pytest.approx(0.02)
    assert vanilla.delta is None  # the reference itself, as in the paper

    ent = cells[("ent", "countdown")]
    assert ent.cell.n == 2 and ent.cell.spread_kind == "range"
    assert (ent.cell.low, ent.cell.high) == pytest.approx((0.61, 0.63))
    assert ent.delta == pytest.approx(0.0)

    tre_k = cells[("tre-k", "countdown")]
    assert tre_k.cell.params["k"] == 2 and tre_k.cell.n == 1 and tre_k.cell.spread_kind is None
    assert tre_k.delta == pytest.approx(0.04)
    tre_p = cells[("tre-p", "countdown")]
    assert tre_p.cell.mean == pytest.approx(0.68) and tre_p.delta == pytest.approx(0.06)

    base = cells[("base", "countdown")]
    assert base.delta is None and base.rank is None  # context only, as in the paper

    # Ranked among every method but Base: TRE-P best, TRE-K second.
    assert tre_p.rank == 1 and tre_k.rank == 2
    assert vanilla.rank is None and ent.rank is None

    # HH: a tie for best marks both; the next value is second.
    assert cells[("tre-p", "hh")].rank == 1 and cells[("kl-cov", "hh")].rank == 1
    assert cells[("vanilla", "hh")].rank == 2 and cells[("ent", "hh")].rank is None
    assert cells[("ent", "hh")].delta == pytest.approx(-1.0)
    assert ("base", "hh") not in cells

    assert any("TRE-K (K=2)" in note and "TRE-P (P=0.99)" in note and "Ent (α=0.001)" in note for note in table.notes)


def test_best_score_uses_best_eval(small_set):
    cells = _cells(rp.build_table1(records_of(small_set, "best"), "best"))
    assert cells[("ent", "countdown")].cell.mean == pytest.approx(0.9)
    assert cells[("ent", "countdown")].rank == 1
    with pytest.raises(ValueError, match="--score"):
        rp.usable_records(rp.load_local_runs([small_set]), "last")


def test_markdown_csv_latex(small_set):
    table = rp.build_table1(records_of(small_set))
    md = rp.render_markdown(table)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert "Qwen2.5-1.5B-Instruct Countdown Pass@1 (%)" in header and "HH Reward" in header
    row = {
        line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and not line.startswith("| Method")
    }
    assert "| **68.00** ±2.00 (+6.00) n=3 |" in row["TRE-P"]
    assert "| <u>66.00</u> (+4.00) n=1 |" in row["TRE-K"]
    assert "62.00 [61.00, 63.00] (+0.00) n=2" in row["Ent"]
    assert "| 5.00 n=1 | – |" in row["**Base**"]
    assert "**3.5000** (+0.5000) n=1" in row["TRE-P"] and "**3.5000** (+0.5000) n=1" in row["KL-Cov"]
    assert "sample standard deviation" in md and "[min, max] when n = 2" in md

    parsed = list(csv.DictReader(io.StringIO(rp.render_csv(table))))
    tre_p = next(r for r in parsed if r["method"] == "tre-p" and r["task"] == "countdown")
    assert float(tre_p["mean"]) == pytest.approx(68.0) and float(tre_p["std"]) == pytest.approx(2.0)
    assert float(tre_p["delta_to_vanilla"]) == pytest.approx(6.0) and tre_p["rank"] == "1"
    assert tre_p["seeds"] == "0 1 2" and tre_p["unit"] == "%" and tre_p["variant"] == "TRE-P (P=0.99)"
    base = next(r for r in parsed if r["method"] == "base")
    assert base["delta_to_vanilla"] == "" and base["rank"] == ""
    assert len(parsed) == 9  # 5 Countdown cells + 4 HH cells

    tex = rp.render_latex(table)
    assert tex.count("\\begin{tabular}{lcc}") == 1 and "\\bottomrule" in tex
    assert "\\textbf{68.00} {\\scriptsize $\\pm$2.00 (+6.00) n=3}" in tex
    assert "\\underline{66.00}" in tex
    assert "Pass@1 (\\%)" in tex and "\\textbf{Vanilla (PPO)}" in tex
    body = [line for line in tex.splitlines() if line.endswith("\\\\") and "&" in line and "multicolumn" not in line]
    assert len(body) == 1 + len(table.rows)
    assert all(line.count("&") == len(table.columns) for line in body)


def test_latex_escape():
    assert rp.latex_escape("a_b & 5% #1 α") == "a\\_b \\& 5\\% \\#1 $\\alpha$"


def test_main_variant_missing_falls_back_with_a_note(tmp_path):
    make_run(tmp_path, "vanilla", "countdown", 0, [0.5])
    make_run(tmp_path, "tre-k", "countdown", 0, [0.6], params={"k": 5})
    table = rp.build_table1(records_of(tmp_path))
    assert _cells(table)[("tre-k", "countdown")].cell.params["k"] == 5
    assert any(
        "TRE-K (K=5) in Qwen2.5-1.5B-Instruct Countdown (its main variant TRE-K (K=2) has no runs)" in n
        for n in table.notes
    )


def test_horizon_runs_stay_out_of_table1(tmp_path):
    # Main T=512 has three methods; T=32 only Vanilla and Ent (Figure 1's runs).
    for method in ("vanilla", "ent", "tre-p"):
        make_run(tmp_path, method, "countdown", 0, [0.5])
    make_run(tmp_path, "vanilla", "countdown", 0, [0.1], max_new_tokens=32)
    make_run(tmp_path, "ent", "countdown", 0, [0.2], max_new_tokens=32)
    table = rp.build_table1(records_of(tmp_path))
    assert [c.max_new_tokens for c in table.columns] == [512]
    assert _cells(table)[("ent", "countdown")].delta == pytest.approx(0.0)
    assert any("T=512" in n and "T=32" in n for n in table.notes)


def test_base_evals_are_one_cell_whatever_the_configs_method(tmp_path):
    make_run(tmp_path, "vanilla", "countdown", 0, [0.5])
    make_base(tmp_path, "countdown", 0.02, method="tre-p")
    make_base(tmp_path, "countdown", 0.04, method="vanilla")
    base = _cells(rp.build_table1(records_of(tmp_path)))[("base", "countdown")]
    assert base.cell.n == 2 and base.cell.mean == pytest.approx(0.03) and base.cell.params == {}


def test_min_ent_is_figure_4s_not_table_1s(tmp_path):
    make_run(tmp_path, "vanilla", "countdown", 0, [0.5])
    make_run(tmp_path, "min-ent", "countdown", 0, [0.9])
    table = rp.build_table1(records_of(tmp_path))
    assert [row.method for row in table.rows] == ["vanilla"]
    assert any(note.startswith("Min-Ent: in Figure 4") for note in table.notes)


def test_terminal_table_renders(small_set):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rp.render_rich(rp.build_table1(records_of(small_set))))
    text = console.export_text()
    assert "TRE-P" in text and "68.00" in text and "(+6.00)" in text and "n=3" in text
    assert "[min, max] when n = 2" in text  # notes are printed as text, not read as rich markup


# --------------------------------------------------------------------------- loading


def test_store_lines_without_their_run_directory_still_count(tmp_path):
    make_run(tmp_path, "vanilla", "countdown", 0, [0.5])
    moved = make_run(tmp_path, "tre-p", "countdown", 0, [0.7], p_max=[0.5])
    import shutil

    shutil.rmtree(moved)
    runs = rp.load_local_runs([tmp_path])
    assert len(runs) == 2
    records = {r.method: r for r in map(rp.record_from_run, runs)}
    assert records["tre-p"].final_eval == pytest.approx(0.7) and records["tre-p"].p_max == ()


def test_run_directories_and_store_are_read_once(small_set):
    run_dirs = sorted(p for p in small_set.iterdir() if p.is_dir())
    both = rp.load_local_runs([small_set, run_dirs[0], small_set / "results.jsonl"])
    assert len(both) == len(run_dirs) == 15


def test_unfinished_runs_are_left_out_with_a_note(tmp_path):
    make_run(tmp_path, "vanilla", "countdown", 0, [0.5])
    make_run(tmp_path, "vanilla", "countdown", 1, [0.9], status="failed")
    records, notes = rp.usable_records(rp.load_local_runs([tmp_path]))
    assert [r.seed for r in records] == [0]
    assert notes == ["left out runs not finished: 1 failed"]


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no runs found"):
        rp.usable_records(rp.load_local_runs([tmp_path]))
    with pytest.raises(FileNotFoundError, match="no such run or results directory"):
        rp.load_local_runs([tmp_path / "missing"])


# --------------------------------------------------------------------------- smoothing


def test_ema_matches_a_hand_computation():
    # weight 0.8, debiased: s_n = (0.2 * sum_i 0.8^(n-i) y_i) / (1 - 0.8^n)
    values = [1.0, 0.0, 0.5]
    expected = [
        (0.2 * 1.0) / 0.2,  # 1.0: the first point is itself
        (0.2 * 0.8 * 1.0 + 0.2 * 0.0) / (1 - 0.64),  # 0.16 / 0.36 = 0.4444...
        (0.2 * 0.64 * 1.0 + 0.2 * 0.8 * 0.0 + 0.2 * 0.5) / (1 - 0.512),  # 0.228 / 0.488 = 0.4672...
    ]
    assert rp.ema_smooth(values, 0.8) == pytest.approx(expected)
    assert expected[1] == pytest.approx(4 / 9) and expected[2] == pytest.approx(0.228 / 0.488)
    assert rp.ema_smooth(values, 0.0) == values
    assert rp.ema_smooth([0.3, 0.3, 0.3]) == [0.3, 0.3, 0.3]
    nan_kept = rp.ema_smooth([1.0, math.nan, 0.0])
    assert nan_kept[0] == 1.0 and math.isnan(nan_kept[1]) and nan_kept[2] == pytest.approx(0.16 / 0.36)
    with pytest.raises(ValueError, match="smoothing weight"):
        rp.ema_smooth(values, 1.0)


# --------------------------------------------------------------------------- figures


@pytest.fixture(scope="module")
def figure_set(tmp_path_factory) -> Path:
    """Horizon runs (Ent alpha 0.01/0.001 at T 32/128/512 on Countdown, T 512/1024 on MATH),
    hparam runs (K 2/5/10, P 0.9/0.99, Min-Ent), P_max logs (two seeds for Vanilla) and tail mass
    logs (Vanilla's seed 1, TRE-K K=2)."""
    root = tmp_path_factory.mktemp("figs")
    for task, horizons in (("countdown", (32, 128, 512)), ("math", (512, 1024))):
        for t in horizons:
            make_run(root, "vanilla", task, 0, [0.3 + t / 2000], max_new_tokens=t, p_max=[0.6, 0.8, 0.9])
            for alpha in (0.01, 0.001):
                make_run(
                    root,
                    "ent",
                    task,
                    0,
                    [0.3 + t / 2000 + (0.02 if t < 512 else -0.03) * alpha * 100],
                    max_new_tokens=t,
                    params={"alpha": alpha},
                )
    big = 1024
    make_run(root, "vanilla", "math", 1, [0.8], max_new_tokens=big, p_max=[0.5, 0.7, 0.95])
    make_run(root, "vanilla", "countdown", 1, [0.55], p_max=[0.5, 0.7, 0.95], curves={M.TAIL_MASS: [1e-4, 2e-4, 1e-4]})
    for k in (2, 5, 10):
        make_run(
            root, "tre-k", "countdown", 0, [0.6 - k / 100], params={"k": k}, p_max=[0.6, 0.7, 0.7] if k == 2 else (),
            curves={M.TAIL_MASS: [1e-4, 1e-4, 1e-4]} if k == 2 else None,
        )
    for p in (0.9, 0.99):
        make_run(
            root,
            "tre-p",
            "countdown",
            0,
            [0.6 + p / 100],
            params={"p": p},
            p_max=[0.6, 0.65, 0.66] if p == 0.99 else (),
        )
    make_run(root, "min-ent", "countdown", 0, [0.4])
    return root


def _twins(fig) -> list:
    """Pairs of visible axes drawn at the same place (what twinx makes)."""
    axes = [ax for ax in fig.axes if ax.get_visible()]
    return [
        (a, b) for i, a in enumerate(axes) for b in axes[i + 1:] if tuple(a.get_position().bounds) == tuple(
            b.get_position().bounds
        )
    ]


def test_horizon_figure(figure_set):
    panels = rp.horizon_data(records_of(figure_set))
    assert [(p.task, [t for t, _ in p.vanilla]) for p in panels] == [
        ("math", [512, 1024]),
        ("countdown", [32, 128, 512]),
    ]
    countdown = panels[1]
    assert [line.label for line in countdown.lines] == ["Ent (α=0.01)", "Ent (α=0.001)"]
    deltas = dict(countdown.lines[0].points)
    assert deltas[32].mean == pytest.approx(0.02) and deltas[32].n == 1
    # T=512 has a second Vanilla seed (0.55): Vanilla's mean is 0.553 (range 0.55..0.556), Ent's 0.526.
    assert deltas[512].mean == pytest.approx(0.526 - 0.553)
    vanilla = dict(countdown.vanilla)[512]
    assert (vanilla.low, vanilla.high, vanilla.n) == pytest.approx((0.55, 0.556, 2))
    fig = rp.plot_horizon(panels)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4 and _twins(fig) == []  # two panels per task, none on another's twin axis
    left = [ax for ax in axes if ax.get_ylabel().startswith("Δ")]
    right = [ax for ax in axes if ax.get_ylabel().startswith("Vanilla")]
    assert len(left) == 2 and len(right) == 2
    for ax in left:
        assert [c.get_label() for c in ax.containers] == ["Ent (α=0.01)", "Ent (α=0.001)"]
        assert ax.get_xscale() == "log"
    [vanilla_bars] = right[1].containers
    assert list(vanilla_bars.lines[0].get_ydata()) == pytest.approx([31.6, 36.4, 55.3])
    assert vanilla_bars.lines[0].get_linestyle() == "--"
    # Vanilla's two seeds at T=512: its error bar spans their min-max.
    segments = vanilla_bars.lines[2][0].get_segments()
    assert [segments[2][0][1], segments[2][1][1]] == pytest.approx([55.0, 55.6])
    assert "error bars: min-max over 2 seeds (one seed: none)" in fig._suptitle.get_text()


def test_horizon_figure_of_the_mechanism_sweep(tmp_path):
    """Ent, TRE-K and TRE-P, each at its own alpha, with three seeds at T 32 and 64."""
    variants = {"vanilla": {}, "ent": {"alpha": 0.03}, "tre-k": {"k": 2, "alpha": 0.003},
                "tre-p": {"p": 0.99, "alpha": 0.003}}
    gain = {"vanilla": 0.0, "ent": -0.02, "tre-k": 0.01, "tre-p": 0.0}
    for method, params in variants.items():
        for t in (32, 64):
            for seed in range(3):
                own = 0.003 * seed if method == "ent" else 0.0  # Ent's seeds differ from Vanilla's a little more
                make_run(tmp_path, method, "countdown", seed, [0.1 + gain[method] * t / 32 + seed / 100 + own],
                         max_new_tokens=t, params=params)
    [panel] = rp.horizon_data(records_of(tmp_path))
    assert [line.label for line in panel.lines] == ["Ent (α=0.03)", "TRE-K (K=2, α=0.003)", "TRE-P (P=0.99, α=0.003)"]
    ent = dict(panel.lines[0].points)
    assert ent[64].mean == pytest.approx(-0.037)
    # The same seeds ran for both: the spread is over each seed's difference to Vanilla's same seed
    # (-0.040, -0.037, -0.034), not over Ent's seeds less Vanilla's mean (-0.050 .. -0.024).
    assert panel.lines[0].paired == {32, 64}
    assert (ent[64].low, ent[64].high, ent[64].n) == pytest.approx((-0.04, -0.034, 3))
    assert len({line.color for line in panel.lines}) == 3
    fig = rp.plot_horizon([panel])
    assert _twins(fig) == [] and "min-max over 3 seeds" in fig._suptitle.get_text()
    assert "each seed's score less Vanilla's of the same seed" in fig._suptitle.get_text()

    # Seeds that do not match (Ent's seed 2 missing at T=64): that T falls back on Vanilla's mean.
    unpaired = [r for r in records_of(tmp_path) if not (r.method == "ent" and r.max_new_tokens == 64 and r.seed == 2)]
    [panel] = rp.horizon_data(unpaired)
    ent = dict(panel.lines[0].points)
    assert panel.lines[0].paired == {32}
    assert (ent[64].low, ent[64].high, ent[64].n) == pytest.approx((0.06 - 0.11, 0.073 - 0.11, 2))
    assert "where both ran the same seeds, else less its mean" in rp.plot_horizon([panel])._suptitle.get_text()


def test_pmax_figure(figure_set):
    panels = rp.pmax_data(records_of(figure_set))
    assert [p.task for p in panels] == ["countdown"]  # MATH has Vanilla only
    curves = {c.label: c for c in panels[0].curves}
    assert set(curves) == {"Vanilla", "TRE-K (K=2)", "TRE-P (P=0.99)"}
    vanilla = curves["Vanilla"]
    assert vanilla.n == 2 and vanilla.steps == (1, 2, 3)
    seed0, seed1 = rp.ema_smooth([0.6, 0.8, 0.9]), rp.ema_smooth([0.5, 0.7, 0.95])
    assert vanilla.mean == pytest.approx([(a + b) / 2 for a, b in zip(seed0, seed1)])
    assert vanilla.low == pytest.approx([min(a, b) for a, b in zip(seed0, seed1)])
    fig = rp.plot_pmax(panels)
    [ax] = [ax for ax in fig.axes if ax.get_visible()]
    assert len(ax.get_lines()) == 3
    assert len(ax.collections) == 1  # a band only for the curve with several seeds
    assert "band: min-max over 2 seeds (one seed: none)" in fig._suptitle.get_text()
    assert "EMA-smoothed (0.8)" in fig._suptitle.get_text()


def test_hparam_figure(figure_set):
    panels = rp.hparam_data(records_of(figure_set))
    assert [p.task for p in panels] == ["countdown"]
    panel = panels[0]
    assert [p.label for p in panel.points] == ["K=2", "K=5", "K=10", "P=0.9", "P=0.99", "Min-Ent"]
    assert panel.vanilla == pytest.approx(statistics.fmean([0.3 + 512 / 2000, 0.55]))
    fig = rp.plot_hparam(panels)
    [ax] = [ax for ax in fig.axes if ax.get_visible()]
    assert [len(c.lines[0].get_xdata()) for c in ax.containers] == [3, 2, 1]  # K, P, Min-Ent
    [vanilla_line] = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert vanilla_line.get_color() == "red"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["K=2", "K=5", "K=10", "P=0.9", "P=0.99", "Min-Ent"]


def test_hparam_figure_needs_more_than_table1s_variants(tmp_path):
    make_run(tmp_path, "vanilla", "countdown", 0, [0.5])
    make_run(tmp_path, "tre-k", "countdown", 0, [0.6])
    make_run(tmp_path, "tre-p", "countdown", 0, [0.7])
    with pytest.raises(rp.NotEnoughData, match="beyond K=2 and P=0.99"):
        rp.hparam_data(records_of(tmp_path))


def test_figures_have_one_legend_outside_the_panels(figure_set):
    records = records_of(figure_set)
    for fig in (rp.plot_horizon(rp.horizon_data(records)), rp.plot_hparam(rp.hparam_data(records))):
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    fig1_labels = [t.get_text() for t in rp.plot_horizon(rp.horizon_data(records)).legends[0].get_texts()]
    assert fig1_labels == ["Ent (α=0.01)", "Ent (α=0.001)", "Vanilla's own score (right panels)"]


def test_write_report_writes_every_file(figure_set, tmp_path):
    report = rp.write_report(rp.load_local_runs([figure_set]), tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([
        "table1.md", "table1.csv", "table1.tex", "mechanism.md", "mechanism.csv",
        "fig1_horizon.png", "fig1_horizon.svg", "fig3_pmax.png", "fig3_pmax.svg", "fig4_hparam.png", "fig4_hparam.svg",
        "fig_mechanism.png", "fig_mechanism.svg",
    ])
    assert report.skipped == []
    for stem in rp.FIGURES:
        assert (tmp_path / "out" / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
        root = ET.parse(tmp_path / "out" / f"{stem}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_missing_figure_data_is_skipped_with_one_line(small_set, tmp_path):
    report = rp.write_report(rp.load_local_runs([small_set]), tmp_path / "out")
    # small_set: no horizon runs; Countdown has P_max for Vanilla, TRE-K, TRE-P and two K values;
    # no run logged a tail metric (as runs of tre before issue 19): the mechanism table is written
    # (P_max and reward), its figure is not.
    assert [line.split(":")[0] for line in report.skipped] == ["fig1_horizon", "fig_mechanism"]
    assert (tmp_path / "out" / "fig3_pmax.png").exists() and not (tmp_path / "out" / "fig1_horizon.png").exists()
    assert (tmp_path / "out" / "mechanism.md").exists() and not (tmp_path / "out" / "fig_mechanism.png").exists()
    assert "actor/tail_mass or rollout/tail_draws_per_response" in report.skipped[1]

    bare = tmp_path / "bare"
    make_run(bare, "vanilla", "countdown", 0, [0.5])
    make_run(bare, "tre-p", "countdown", 0, [0.6])
    report = rp.write_report(rp.load_local_runs([bare]), tmp_path / "out2")
    assert [line.split(":")[0] for line in report.skipped] == [
        "mechanism", "fig1_horizon", "fig3_pmax", "fig4_hparam", "fig_mechanism"
    ]
    assert all(len(line.splitlines()) == 1 and "needs" in line for line in report.skipped)
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["table1.csv", "table1.md", "table1.tex"]


# --------------------------------------------------------------------------- W&B


class _FakeWandbRun:
    """The public API's Run as the reader uses it: config, summary_metrics, state, url, scan_history."""

    def __init__(self, config, summary, state, history):
        self.config, self.summary_metrics, self.state, self.url = config, summary, state, "https://wandb.ai/e/p/runs/x"
        self._history = history

    def scan_history(self, keys):
        return [row for row in self._history if all(k in row for k in keys)]


def test_wandb_runs_read_like_run_directories():
    cfg = to_dict(
        from_dict(
            {
                "task": {"name": "countdown"},
                "method": {"name": "tre-k", "k": 5},
                "rollout": {"max_new_tokens": 64},
                "run": {"seed": 3},
            }
        )
    )
    history = [
        {"_step": 1, M.P_MAX: 0.5, M.TAIL_MASS: 1e-4},
        {"_step": 2, M.P_MAX: 0.6, M.EVAL_SCORE: 0.25},
        {"_step": 3, M.EVAL_SCORE: 0.5},
    ]
    run = wandb_run_to_run(
        _FakeWandbRun(cfg, {"final_eval": 0.5, "best_eval": 0.5, "status": "finished"}, "finished", history)
    )
    record = rp.record_from_run(run)
    assert (record.method, record.task, record.seed, record.max_new_tokens) == ("tre-k", "countdown", 3, 64)
    assert record.param_dict["k"] == 5 and record.final_eval == 0.5 and record.status == "finished"
    # Each curve read on its own: step 2 lacks a tail mass, and P_max keeps it.
    assert record.p_max == ((1, 0.5), (2, 0.6)) and record.curve(M.TAIL_MASS) == ((1, 1e-4),)
    assert record.curve(M.REWARD_MEAN) == ()
    crashed = wandb_run_to_run(_FakeWandbRun(cfg, {}, "crashed", history))
    assert crashed["result"]["status"] == "failed" and crashed["result"]["final_eval"] == 0.5
    assert wandb_run_to_run(_FakeWandbRun({"report": True}, {}, "finished", [])) is None


def test_report_logged_to_wandb_offline(small_set, tmp_path):
    pytest.importorskip("wandb")
    from tre_cli.tracking import log_report_to_wandb

    report = rp.write_report(rp.load_local_runs([small_set]), tmp_path / "out")
    tables, images = rp.wandb_payload(report)
    assert set(images) == {"fig3_pmax", "fig4_hparam"} and len(tables["table1"][1]) == 9
    run_id = log_report_to_wandb("tre-test", None, "offline", tmp_path / "out", tables, images)
    [offline] = list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0


def test_wandb_target():
    def run(mode, project="tre"):
        return {
            "path": "x",
            "config": {
                "method": {"name": "vanilla"},
                "task": {"name": "countdown"},
                "model": {"name": "m"},
                "run": {"wandb": {"mode": mode, "project": project, "entity": None}},
            },
            "result": None,
        }

    assert rp.wandb_target([run("online")], None, None) == (None, "tre", "online")
    assert rp.wandb_target([run("offline")], None, None) is None
    assert rp.wandb_target([run("online"), run("online", "other")], None, None) is None
    assert rp.wandb_target([run("offline")], None, True) == (None, "tre", "offline")
    assert rp.wandb_target([run("online")], "team/proj", None) == ("team", "proj", "online")
    assert rp.wandb_target([run("online")], "team/proj", False) is None
    with pytest.raises(ValueError, match="--log-wandb"):
        rp.wandb_target([run("disabled")], None, True)


# --------------------------------------------------------------------------- CLI


def test_cli_report_end_to_end(figure_set, small_set, tmp_path):
    runner = CliRunner()
    out = tmp_path / "report"
    done = runner.invoke(app, ["report", str(figure_set), "--out", str(out), "--no-log-wandb"])
    assert done.exit_code == 0, done.output
    assert "Table 1" in done.output and "fig4_hparam.png" in done.output
    assert "fig_mechanism.png" in done.output and "mechanism.md" in done.output
    assert (out / "table1.md").exists() and (out / "fig1_horizon.svg").exists() and (out / "mechanism.csv").exists()

    skipped = runner.invoke(
        app, ["report", str(small_set), "--out", str(tmp_path / "r2"), "--score", "best", "--no-log-wandb"]
    )
    assert skipped.exit_code == 0, skipped.output
    assert "fig1_horizon: skipped" in skipped.output

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = runner.invoke(app, ["report", str(empty), "--out", str(tmp_path / "r3")])
    assert failed.exit_code != 0
    assert "no runs found" in failed.output and "Traceback" not in failed.output
    assert not (tmp_path / "r3").exists()

    none = runner.invoke(app, ["report", "--out", str(tmp_path / "r4")])
    assert none.exit_code != 0 and "no runs" in none.output

    bad = runner.invoke(app, ["report", "--wandb", "no-slash", "--out", str(tmp_path / "r5")])
    assert bad.exit_code != 0 and "--wandb expects ENTITY/PROJECT" in bad.output
