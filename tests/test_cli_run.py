"""`tre run` and `tre eval` from the command line: bad input is one line and nothing written;
a tiny run and an evaluation end to end."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from tre_cli.cli import app

runner = CliRunner()


def _invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "tre-x"], "unknown method 'tre-x'"),
        (["--task", "chess"], "unknown task 'chess'"),
        (["--set", "method.p=1.5"], "'method.p' must be in (0, 1]"),
        (["--set", "method.p=0"], "'method.p' must be in (0, 1]"),
        (["--method", "tre-k", "--set", "method.k=0"], "'method.k' must be"),
        (["--method", "tre-k", "--set", "method.k=1"], "'method.k' must be an integer >= 2, got 1 (K = 1 is Min-Ent, "
                                                       "-log max pi: use method min-ent)"),
        (["--method", "ent", "--set", "method.alpha=-0.1"], "'method.alpha' must be >= 0"),
        (["--set", "ppo.lr=1e-6"], "unknown config key 'ppo.lr' (did you mean 'ppo.actor_lr'?)"),
        (["--method", "tre-p", "--set", "method.k=5"], "'method.k' is not a parameter of method 'tre-p'"),
        (["--device", "cuda"], "no CUDA device is available"),
        (["--model", "/no/such/model/dir"], "/no/such/model/dir"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--method", "forking-tokens", "--set", "ppo.loss_agg=seq-mean-token-mean"],
         "config key 'ppo.loss_agg' does not go with method 'forking-tokens'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    import torch

    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    result = _invoke(["run", "--out", str(out), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()


def test_vllm_engine_without_vllm_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees where it is not installed
    out = tmp_path / "run"
    result = _invoke(["run", "--preset", "smoke", "--rollout", "vllm", "--out", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tre-cli[vllm]'" in lines[0], result.stderr
    assert not out.exists()


def test_malformed_yaml_config_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  actor_lr: 1e-6\n  clip: [0.2\n")
    result = _invoke(["run", "--config", str(bad), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert re.search(r"bad\.yaml:\d+: malformed YAML", result.stderr), result.stderr
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_never_overwritten(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke(["run", "--model", str(tiny_testbed), "--preset", "smoke", "--out", str(out),
                      "--set", "run.wandb.mode=disabled"])
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


TINY_SETS = ["ppo.steps=1", "ppo.prompts_per_step=2", "ppo.mini_batch_prompts=2", "ppo.rollouts_per_prompt=2",
             "rollout.max_new_tokens=8", "eval.limit=2", "eval.n_samples=1", "run.wandb.mode=disabled",
             "task.options.train_size=16", "task.options.test_size=4"]


def _sets(items):
    return ["--preset", "smoke", *[arg for item in items for arg in ("--set", item)]]


def test_run_then_evaluate_its_checkpoint(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    result = _invoke(["run", "--method", "tre-p", "--model", str(tiny_testbed), "--out", str(out), *_sets(TINY_SETS)])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "result.json").read_text())["status"] == "finished"
    ev = tmp_path / "eval"
    result = _invoke(
        ["eval", "--model", str(out), "--out", str(ev), *_sets(s for s in TINY_SETS if not s.startswith("ppo."))]
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads((ev / "result.json").read_text())
    assert record["method"] == "base" and record["steps_done"] == 0 and record["final_eval"] is not None
    assert record["config"]["model"]["name"].endswith("checkpoints/step_1/policy")


def test_resume_refuses_other_options(tmp_path):
    result = _invoke(["run", "--resume", str(tmp_path), "--method", "ent"])
    assert result.exit_code == 2 and "--resume" in result.stderr
