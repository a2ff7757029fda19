"""Progress within a step (issue 13): on stderr only, plain lines when asked for off a terminal,
the engines' reports monotone and complete, and nothing it shows changes what is sampled."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from tre_cli.cli import app
from tre_cli.rollout.hf import HFEngine
from tre_cli.trainer.progress import NO_PHASES, LinePhases, show_progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(buffer: io.StringIO) -> list[str]:
    return [line.strip() for line in buffer.getvalue().splitlines() if line.strip()]


def test_line_phases_print_at_most_every_interval_and_at_the_end():
    buffer, clock = io.StringIO(), Clock()
    phases = LinePhases(Console(file=buffer, width=200), every_s=10.0, clock=clock)
    phases.start("generate", 64, "sequences")
    phases.update("generate", 5)
    assert _lines(buffer) == ["generate 0/64 sequences (0s)"]  # the start; the update is too soon
    clock.now = 12.0
    phases.update("generate", 20)
    clock.now = 15.0
    phases.update("generate", 30)  # 3 s after the last line: nothing
    clock.now = 31.0
    phases.update("update", 1)  # a phase that was never started: ignored
    phases.done("generate")
    assert _lines(buffer)[1:] == ["generate 20/64 sequences (12s)", "generate 64/64 sequences (31s)"]


def test_show_progress_modes():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    log_file = Console(file=io.StringIO(), force_terminal=False)
    assert show_progress("auto", terminal) == "live" and show_progress("off", terminal) == "none"
    assert show_progress("auto", log_file) == "none"
    assert show_progress("on", log_file) == "lines" == show_progress("auto", log_file, verbose=True)
    with pytest.raises(ValueError, match="progress mode"):
        show_progress("sometimes", log_file)


def test_hf_engine_reports_finished_sequences_without_changing_the_samples(quick_policy, quick_tokenizer):
    prompts = [quick_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Using the numbers", "<answer>")]
    seen: list[int] = []
    reported = HFEngine(quick_policy, quick_tokenizer, seed=3).generate(prompts, n=3, max_new_tokens=12,
                                                                        progress=seen.append)
    plain = HFEngine(quick_policy, quick_tokenizer, seed=3).generate(prompts, n=3, max_new_tokens=12)
    assert torch.equal(reported.response_ids, plain.response_ids)
    assert seen == sorted(seen) and seen[-1] == 6 and len(seen) >= 2
    assert NO_PHASES.counter("generate")(3) is None  # the silent default takes the same calls


TINY = ["ppo.steps=1", "ppo.prompts_per_step=2", "ppo.mini_batch_prompts=1", "ppo.rollouts_per_prompt=2",
        "rollout.max_new_tokens=8", "eval.limit=2", "eval.n_samples=1", "eval.before_train=false",
        "run.wandb.mode=disabled", "task.options.train_size=16", "task.options.test_size=4"]


def test_progress_goes_to_stderr_and_the_step_lines_stay_on_stdout(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_testbed), "--preset", "smoke", "--out", str(out), "--set", "run.progress=on",
            *[a for s in TINY for a in ("--set", s)]]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    stdout = [line for line in result.stdout.splitlines() if line.strip()]
    assert stdout[0].startswith("run ") and stdout[-1].startswith("done ")
    assert all(line.startswith(("run", "step", "done", " ")) for line in stdout), stdout
    assert [line for line in stdout if line.startswith("step")][0].startswith("step    1/1")
    errs = result.stderr
    for shown in ("generate 4/4 sequences", "old log-probs 1/1 micro-batches", "update 2/2 mini-batches",
                  "eval 2/2 sequences"):
        assert shown in errs, errs
    assert "generate" not in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
