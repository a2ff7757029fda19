"""`tre sweep`: sweep files, grid expansion, validation before Ray, and real Ray Tune sweeps of tiny
trials (end to end, a failing trial retried from its checkpoint, a killed sweep resumed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tre_cli import sweep
from tre_cli.cli import app
from tre_cli.io import read_jsonl
from tre_cli.sweep.outcome import FAIL_ONCE_MARKER
from tre_cli.tracking import read_results

runner = CliRunner()
VOLATILE = ("time", "timing/", "perf/")


# ----------------------------------------------------------------------------- the sweep files

# (sweep, preset, tasks) -> trials, from the issue: horizon 4 variants x 5 T per task; hparam 8
# variants; main 6 methods + Base x 2 models; smoke presets run Countdown only.
EXPECTED_COUNTS = {
    ("horizon", "paper", ("math", "countdown")): 2 * 4 * 5,
    ("horizon", "smoke", ("countdown",)): 4 * 2,
    ("hparam", "paper", ("math", "countdown", "hh")): 3 * 8,
    ("hparam", "smoke", ("countdown",)): 8,
    ("main", "paper", ("math", "countdown", "hh")): 3 * 2 * 7,
    ("main", "smoke", ("countdown",)): 7,
    # mechanism: 4 variants x T (2, or SmolLM2's 1) x seeds (3, or SmolLM2's 2)
    ("mechanism", "paper", ("countdown",)): 4 * 2 * 3,
    ("mechanism", "smoke", ("countdown",)): 4 * 2 * 3,
    ("mechanism", "smollm2", ("countdown",)): 4 * 1 * 2,
    ("grpo", "paper", ("countdown",)): 4,  # issue 21: 4 methods under GRPO
    ("grpo", "smoke", ("countdown",)): 4,
    ("grpo", "smollm2", ("countdown",)): 4 * 2,
}


def test_mechanism_smoke_gives_each_bonus_its_alpha_and_every_trial_its_seed():
    """The mechanism sweep's smoke trials: the variants named as the report and docs expect,
    each method's own alpha, T in {32, 64}, three seeds, the diagnostics' defaults."""
    spec = sweep.load_sweep("mechanism", "smoke")
    trials = sweep.expand_grid(spec)
    by_variant: dict[str, set] = {}
    for trial in trials:
        by_variant.setdefault(trial.variant, set()).add((trial.max_new_tokens, trial.seed))
    assert set(by_variant) == {"vanilla", "ent", "tre-k", "tre-p"}
    assert all(cells == {(t, s) for t in (32, 64) for s in (0, 1, 2)} for cells in by_variant.values())
    alphas = {t.variant: dict(t.values).get("method.alpha") for t in trials}
    assert alphas["vanilla"] in (None, 0, 0.0) and all(alphas[m] > 0 for m in ("ent", "tre-k", "tre-p"))


@pytest.mark.parametrize("name,preset,tasks", list(EXPECTED_COUNTS))
def test_every_sweep_file_and_preset_expands(name, preset, tasks):
    spec = sweep.load_sweep(name, preset)
    assert spec.tasks == tasks
    trials = sweep.expand_grid(spec)
    assert len(trials) == EXPECTED_COUNTS[(name, preset, tasks)]
    assert len({t.name for t in trials}) == len(trials)
    assert all(sweep.safe_name(t.name) for t in trials)


def test_horizon_paper_grid_is_the_papers():
    spec = sweep.load_sweep("horizon")
    trials = sweep.expand_grid(spec, ["countdown"])
    assert sorted({t.max_new_tokens for t in trials}) == [32, 64, 128, 256, 512]
    assert sorted({t.max_new_tokens for t in sweep.expand_grid(spec, ["math"])}) == [512, 1024, 2048, 4096, 8192]
    assert {t.variant for t in trials} == {"vanilla", "ent-a0.01", "ent-a0.001", "ent-a0.0001"}
    assert trials[0].name == "countdown-T32-vanilla-s0"


def test_hparam_and_main_variants_are_the_papers(tmp_path):
    plan = sweep.plan_sweep("hparam", ["countdown"], out=tmp_path / "h")
    params = {
        (p.config.method.name, p.config.method.params.get("k"), p.config.method.params.get("p")) for p in plan.trials
    }
    assert params == {("vanilla", None, None), ("tre-k", 2, None), ("tre-k", 5, None), ("tre-k", 10, None),
                      ("tre-p", None, 0.9), ("tre-p", None, 0.99), ("tre-p", None, 0.999), ("min-ent", None, None)}
    assert {p.config.rollout.max_new_tokens for p in plan.trials} == {512}  # Countdown's own T
    main = sweep.plan_sweep("main", ["math"], out=tmp_path / "m")
    assert {p.config.model.name for p in main.trials} == {"Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct"}
    assert {p.trial.variant for p in main.trials} == {
        "base",
        "vanilla",
        "ent",
        "forking-tokens",
        "kl-cov",
        "tre-k",
        "tre-p",
    }
    assert [p.trial.kind for p in main.trials if p.trial.variant == "base"] == ["eval", "eval"]
    assert {p.config.rollout.max_new_tokens for p in main.trials} == {8192}
    assert {p.config.ppo.steps for p in main.trials} == {300}


def test_plan_resolves_every_trial_with_its_grid_values_seeds_and_sets(tmp_path):
    out = tmp_path / "sweep"
    plan = sweep.plan_sweep("horizon", ["countdown"], "smoke", ["ppo.clip=0.3"], out, seeds=[0, 7])
    assert len(plan.trials) == 16
    by_name = {p.trial.name: p for p in plan.trials}
    ent = by_name["countdown-T64-ent-a0.0001-s7"].config
    assert (ent.method.name, ent.method.params["alpha"], ent.rollout.max_new_tokens, ent.run.seed) == (
        "ent",
        0.0001,
        64,
        7,
    )
    assert ent.model.name == "testbed" and ent.ppo.steps == 20 and ent.ppo.clip == 0.3
    assert ent.task.options["train_size"] == 512
    assert ent.run.out == str(out.absolute() / "runs" / "countdown-T64-ent-a0.0001-s7")
    assert ent.run.wandb.group == "horizon" and ent.run.wandb.mode == "offline"
    assert by_name["countdown-T32-vanilla-s0"].config.method.name == "vanilla"
    assert not out.exists()  # planning writes nothing


def test_set_overrides_the_sweep_files_values(tmp_path):
    plan = sweep.plan_sweep("horizon", ["countdown"], "smoke", ["rollout.max_new_tokens=8"], tmp_path / "s")
    assert {p.config.rollout.max_new_tokens for p in plan.trials} == {8}


def _write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def test_grid_values_reach_the_config_as_they_are(tmp_path):
    """No text in between: a float stays that float (1e-05 has no YAML 1.1 float spelling), a
    string that YAML would read as a bool stays a string."""
    variants = {"tiny": {"method": "ent", "alpha": 1e-05}, "far": {"method": "ent", "alpha": 3e-12}}
    content = {**MINIMAL, "variants": variants,
               "set": {"run.wandb.project": "off", "eval.limit": None, "task.options": {"train_size": 16}}}
    plan = sweep.plan_sweep(_write(tmp_path / "s.yaml", content), out=tmp_path / "out")
    by_variant = {p.trial.variant: p for p in plan.trials}
    assert ("method.alpha", 1e-05) in by_variant["tiny"].trial.values
    assert by_variant["tiny"].config.method.params["alpha"] == 1e-05
    assert by_variant["far"].config.method.params["alpha"] == 3e-12
    config = by_variant["tiny"].config
    assert config.run.wandb.project == "off" and config.eval.limit is None
    assert config.task.options["train_size"] == 16


MINIMAL = {"tasks": ["countdown"], "run_preset": "smoke", "models": ["testbed"],
           "variants": {"vanilla": {"method": "vanilla"}}, "presets": {"paper": {}}}


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"tasks": ["chess"]}, "unknown task 'chess'"),
    ({"variants": {"v": {"method": "nope"}}}, "unknown method 'nope'"),
    ({"variants": {"v": {"method": "vanilla", "alpha": 0.1}}}, "'alpha' is not a parameter of method 'vanilla'"),
    ({"variants": {"base": {"method": "vanilla"}}}, "reserved"),
    ({"seeds": [0, 0]}, "lists a value twice"),
    ({"max_new_tokens": {"math": [8]}}, "names task 'math'"),
    ({"resources": {"gpus": 1}}, "takes cpu and gpu"),
    ({"run_preset": "huge"}, "'run_preset' must be one of"),
    ({"presets": {"paper": {"bogus": 1}}}, "unknown key 'bogus'"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, change, message):
    path = _write(tmp_path / "bad.yaml", {**MINIMAL, **change})
    with pytest.raises(ValueError, match=message) as error:
        sweep.plan_sweep(path, out=tmp_path / "out")
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_input_names_the_problem_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown sweep 'nope'"):
        sweep.plan_sweep("nope", out=out)
    with pytest.raises(ValueError, match="unknown preset 'tiny'"):
        sweep.plan_sweep("horizon", preset="tiny", out=out)
    with pytest.raises(ValueError, match="--task hh is not one of them"):
        sweep.plan_sweep("horizon", ["hh"], out=out)
    with pytest.raises(ValueError, match=r"trial countdown-T32-vanilla-s0: .*'method.alpha' is not a parameter"):
        sweep.plan_sweep("horizon", ["countdown"], "smoke", ["method.alpha=0.5"], out)
    with pytest.raises(ValueError, match="format_score"):  # a task option, checked by the task module
        sweep.plan_sweep("horizon", ["countdown"], "smoke", ["task.options.format_score=2"], out)
    with pytest.raises(ValueError, match="distinct"):
        sweep.plan_sweep("horizon", ["countdown"], "smoke", out=out, seeds=[1, 1])
    assert not out.exists()


def test_out_dir_rules_for_fresh_and_resumed_sweeps(tmp_path):
    out = tmp_path / "out"
    plan = sweep.plan_sweep("horizon", ["countdown"], "smoke", out=out)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        sweep.check_out_dir(plan, resume=True)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        sweep.run_sweep(plan)  # refused before Ray starts or anything is written
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / sweep.SWEEP_FILE).write_text(json.dumps(plan.manifest()))
    sweep.check_out_dir(plan, resume=True)
    other = sweep.plan_sweep("horizon", ["countdown"], "smoke", ["ppo.steps=3"], out=out)
    with pytest.raises(ValueError, match="started with sets"):
        sweep.check_out_dir(other, resume=True)


def test_resume_command_repeats_the_options_resume_checks(tmp_path):
    out = tmp_path / "o"
    plan = sweep.plan_sweep("horizon", ["countdown"], "smoke", ["ppo.clip=0.3"], out, seeds=[1, 2])
    command = sweep.resume_command("horizon", plan)
    assert command == (f"tre sweep horizon --out {out.absolute()} --resume --preset smoke --task countdown "
                       "--seeds 1,2 --set ppo.clip=0.3")
    (out).mkdir()
    (out / sweep.SWEEP_FILE).write_text(json.dumps(plan.manifest()))
    again = runner.invoke(app, [*command.split()[1:], "--dry-run"])  # the same options plan the same sweep
    assert again.exit_code == 0, again.output
    replanned = sweep.plan_sweep("horizon", ["countdown"], "smoke", ["ppo.clip=0.3"], out, seeds=[1, 2])
    sweep.check_out_dir(replanned, resume=True)


def test_a_trial_bigger_than_the_machine_is_an_error_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    plan = sweep.plan_sweep("horizon", ["countdown"], "paper", out=out)  # 8 CPUs and a GPU per trial
    with pytest.raises(ValueError, match="asks for 8 CPUs but this machine has 2"):
        sweep.run_sweep(plan, num_cpus=2)
    small = sweep.plan_sweep("horizon", ["countdown"], "paper", out=out, cpus_per_trial=1, gpus_per_trial=1)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for 1 GPUs but this machine has 0"):
            sweep.run_sweep(small, num_cpus=2)
    assert not out.exists()


def test_main_sweeps_7b_trials_take_eight_workers_and_tune_sizes_them(tmp_path):
    """issue 12: the paper trained 7B on 8 GPUs. main.yaml's model_set gives its 7B trials 8
    workers (its Base evaluations stay one process); Tune reserves nothing for a worker trial's
    own process and runs no more such trials at once than the cluster holds."""
    from tre_cli.sweep.grid import concurrency_limit, worker_demand
    from tre_cli.sweep.ray_backend import _reservation, trial_param
    from tre_cli.sweep.spec import Resources

    plan = sweep.plan_sweep("main", ["countdown"], out=tmp_path / "m")
    workers = {(p.config.model.name, p.trial.kind): p.config.run.workers for p in plan.trials}
    assert workers == {("Qwen/Qwen2.5-1.5B-Instruct", "train"): 1, ("Qwen/Qwen2.5-1.5B-Instruct", "eval"): 1,
                       ("Qwen/Qwen2.5-7B-Instruct", "train"): 8, ("Qwen/Qwen2.5-7B-Instruct", "eval"): 8}
    seven = next(p for p in plan.trials if p.config.run.workers == 8 and p.trial.kind == "train")
    param = trial_param(seven, plan.resources, None)
    assert (param["cpus"], param["gpus"], param["workers_gpu"]) == (0.0, 0.0, True)
    assert _reservation({"trial": param}).bundles == [{"memory": 2**20}]
    one = next(p for p in plan.trials if p.config.run.workers == 1)
    assert _reservation({"trial": trial_param(one, plan.resources, None)}).bundles == [{"CPU": 8.0, "GPU": 1.0}]
    assert worker_demand(seven, plan.resources) == Resources(cpu=8.0, gpu=8.0)
    # 16 GPUs hold two 7B trials (or a 7B and 1.5B ones); 7 GPUs not one: an error naming it.
    assert concurrency_limit(plan, {"CPU": 64, "GPU": 16}) == 2
    with pytest.raises(ValueError, match="run.workers needs 8 GPUs and the Ray cluster has 7"):
        concurrency_limit(plan, {"CPU": 64, "GPU": 7})
    smoke = sweep.plan_sweep("main", ["countdown"], "smoke", out=tmp_path / "s")
    assert {p.config.run.workers for p in smoke.trials} == {1}
    assert concurrency_limit(smoke, {"CPU": 2}) == smoke.max_concurrent == 2
    # On CPU a worker takes CPUS_PER_WORKER (1) CPU: 2-worker trials on 2 CPUs run one at a time.
    cpu = sweep.plan_sweep("main", ["countdown"], "smoke", out=tmp_path / "c", sets=["run.workers=2"])
    assert concurrency_limit(cpu, {"CPU": 2}) == 1
    assert concurrency_limit(cpu, {"CPU": 5}) == 2
    with pytest.raises(ValueError, match="needs 2 CPUs and the Ray cluster has 1"):
        sweep.run_sweep(cpu, num_cpus=1)
    assert not (tmp_path / "c").exists()


def test_model_set_applies_to_that_models_trials_and_names_one_of_them(tmp_path):
    content = yaml.safe_load(sweep.sweep_path("main").read_text())
    (countdown_steps,) = {p.config.ppo.steps for p in sweep.plan_sweep("main", ["countdown"], out=tmp_path).trials}
    content["model_set"] = {"Qwen/Qwen2.5-1.5B-Instruct": {"ppo.steps": 7}}
    plan = sweep.plan_sweep(_write(tmp_path / "m.yaml", content), ["countdown"], out=tmp_path / "o")
    steps = {(p.config.model.name, p.config.ppo.steps) for p in plan.trials}
    assert steps == {("Qwen/Qwen2.5-1.5B-Instruct", 7), ("Qwen/Qwen2.5-7B-Instruct", countdown_steps)}
    content["model_set"] = {"Qwen/Qwen2.5-3B-Instruct": {"run.workers": 2}}
    with pytest.raises(ValueError, match="'model_set' names 'Qwen/Qwen2.5-3B-Instruct', which is not in 'models'"):
        sweep.plan_sweep(_write(tmp_path / "bad.yaml", content), ["countdown"], out=tmp_path / "o")


def test_progress_table_counts_trials():
    from rich.console import Console

    trials = [sweep.TrialProgress("a", "done", 4, 4, 0.5, 0.25), sweep.TrialProgress("b", "running", 2, 4, 0.1),
              sweep.TrialProgress("c", "failed", failures=2), sweep.TrialProgress("d")]
    assert sweep.progress_counts(trials) == {"pending": 1, "running": 1, "retrying": 0, "done": 1, "failed": 1}
    console = Console(width=120, record=True)
    console.print(sweep.progress_table("t", trials, 12.0))
    text = console.export_text()
    assert "1/4 done, 1 running, 1 pending, 1 failed, 2 retries" in text
    assert "2/4" in text and "0.250" in text


def test_display_follows_trial_events():
    from rich.console import Console

    console = Console(width=120, record=True, force_terminal=False)
    display = sweep.SweepDisplay("t", ["a"], console)
    display.update("a", "start")
    display.update("a", "result", {"step": 1, "steps": 2, "reward/mean": 0.5})
    display.update("a", "retry", failures=1, error="boom")
    assert display.trials["a"].status == "retrying" and display.trials["a"].failures == 1
    display.update("a", "complete", {"step": 2, "steps": 2, "eval/score": 0.75})
    assert display.trials["a"].status == "done" and display.trials["a"].score == 0.75
    assert "retry a from its last checkpoint" in console.export_text()


def test_cli_dry_run_lists_trials_and_bad_input_is_one_line(tmp_path):
    result = runner.invoke(app, ["sweep", "horizon", "--task", "countdown", "--preset", "smoke", "--dry-run",
                                 "--out", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.stdout.count("countdown-T") == 8
    bad = runner.invoke(app, ["sweep", "horizon", "--preset", "smoke", "--set", "ppo.clip=-1", "--dry-run"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().count("\n") == 0 and "ppo.clip" in bad.stderr
    seeds = runner.invoke(app, ["sweep", "horizon", "--seeds", "a,b", "--dry-run"])
    assert seeds.exit_code == 2 and "--seeds" in seeds.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- real Ray Tune sweeps


def _tiny_sweep(tmp_path: Path, model_dir: Path, variants: dict, steps: int = 4, extra_set: dict | None = None) -> Path:
    """A sweep file of tiny Countdown trials on the tiny testbed (the same sizes as test_trainer)."""
    content = {
        "tasks": ["countdown"], "run_preset": "smoke", "models": [str(model_dir)], "variants": variants,
        "max_new_tokens": {"countdown": [16]}, "seeds": [0],
        "set": {"task.options.train_size": 64, "task.options.test_size": 8, "eval.metric": "pass@1",
                "ppo.steps": steps, "ppo.prompts_per_step": 4, "ppo.rollouts_per_prompt": 2,
                "ppo.mini_batch_prompts": 2, "ppo.micro_batch_tokens": 128, "eval.limit": 4,
                "eval.n_samples": 1, "eval.every": 0, "run.save_every": 2, "run.wandb.mode": "disabled",
                **(extra_set or {})},
        "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2, "max_failures": 2,
        "presets": {"paper": {}},
    }
    return _write(tmp_path / "tiny.yaml", content)


def _stable(record):
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


def _finished_lines(runs: Path):
    return [r for r in read_jsonl(runs / "results.jsonl") if r["status"] == "finished"]


@pytest.mark.slow
def test_sweep_runs_trials_through_ray_and_retries_a_failing_one(tiny_testbed, tmp_path, monkeypatch):
    """Two trials end to end through Ray Tune; each fails once after step 3 (the test hook) and is
    retried from its step-2 checkpoint, so steps 1-2 are kept and 3-4 are computed again."""
    # One trial logs to W&B offline (as the demo does), the other not at all (faster).
    variants = {"vanilla": {"method": "vanilla", "set": {"run.wandb.mode": "offline"}}, "tre-p": {"method": "tre-p"}}
    path = _tiny_sweep(tmp_path, tiny_testbed, variants)
    out = tmp_path / "out"
    plan = sweep.plan_sweep(path, out=out)
    monkeypatch.setenv(sweep.FAIL_ONCE_ENV, "3")
    outcome = sweep.run_sweep(plan, num_cpus=2)
    assert sorted(outcome.finished) == ["countdown-T16-tre-p-s0", "countdown-T16-vanilla-s0"], outcome
    assert not outcome.failed and not outcome.interrupted

    runs = out / "runs"
    lines = read_jsonl(runs / "results.jsonl")
    for name in outcome.finished:
        run_dir = runs / name
        assert [r["status"] for r in lines if r["run_dir"] == name] == ["failed", "finished"]
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        failed_at = (run_dir / FAIL_ONCE_MARKER).stat().st_mtime
        assert metrics[1]["time"] < failed_at < metrics[2]["time"]  # resumed from step 2, not from scratch
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "finished" and result["steps_done"] == 4 and result["final_eval"] is not None
    assert (runs / "countdown-T16-vanilla-s0" / "wandb").is_dir()  # W&B offline, inside the run directory
    assert {r["method"] for r in read_results(runs)} == {"vanilla", "tre-p"}
    # Ray's state and token stay under the output directory.
    assert (out / "ray" / "tune").is_dir()
    token = out / ".ray" / "auth_token"
    assert token.is_file() and oct(token.stat().st_mode & 0o777) == "0o600"
    assert any((out / ".ray" / "tmp").iterdir())

    # tre report reads the sweep's directory.
    report = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report"), "--no-log-wandb"])
    assert report.exit_code == 0, report.output


@pytest.mark.slow
def test_trials_of_two_workers_run_through_tune_and_a_dead_worker_is_retried(tiny_testbed, tmp_path, monkeypatch):
    """issue 12: trials of run.workers=2 (Ray Train inside Ray Tune). On 2 CPUs the trials run
    one at a time (each one's workers take both). Rank 1 of each trial dies at the start of
    step 3 once (the test hook): the trial fails, Tune retries it, and it resumes from its
    step-2 checkpoint. Tune hears every step from the trial's process, which follows rank 0's
    run directory."""
    from tre_cli.trainer.distributed import EXIT_AT_ENV, EXITED_ONCE_MARKER

    variants = {"vanilla": {"method": "vanilla"}, "tre-p": {"method": "tre-p"}}
    path = _tiny_sweep(tmp_path, tiny_testbed, variants, steps=3, extra_set={"run.workers": 2})
    out = tmp_path / "out"
    plan = sweep.plan_sweep(path, out=out)
    monkeypatch.setenv(EXIT_AT_ENV, "1:3:once")
    outcome = sweep.run_sweep(plan, num_cpus=2)
    assert sorted(outcome.finished) == ["countdown-T16-tre-p-s0", "countdown-T16-vanilla-s0"], outcome
    assert not outcome.failed and not outcome.interrupted
    for name in outcome.finished:
        run_dir = out / "runs" / name
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3]
        died = run_dir / EXITED_ONCE_MARKER
        assert died.read_text().strip() == "3"
        assert metrics[1]["time"] < died.stat().st_mtime < metrics[2]["time"]  # resumed from step 2
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "finished" and result["steps_done"] == 3 and result["final_eval"] is not None
        # What Tune received: steps 1 and 2 from the first attempt, step 3 from the retry (which
        # reports only the steps it computes), each with the values rank 0 logged.
        (tune_results,) = (out / "ray" / "tune").glob(f"{name}/result.json")
        reported = read_jsonl(tune_results)
        assert [r["step"] for r in reported] == [1, 2, 3]
        assert reported[-1]["eval/score"] == result["final_eval"]
        assert reported[-1]["reward/mean"] == metrics[-1]["reward/mean"]


@pytest.mark.slow
def test_killed_sweep_resumes_without_losing_or_repeating_results(tiny_testbed, tmp_path):
    # Long enough (a fraction of a second a step) that the kill lands mid-run, not after the end.
    steps = 30
    path = _tiny_sweep(
        tmp_path, tiny_testbed, {"vanilla": {"method": "vanilla"}, "ent": {"method": "ent"}}, steps=steps
    )
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "200"}
    env.pop(sweep.FAIL_ONCE_ENV, None)
    command = [sys.executable, "-m", "tre_cli.cli", "sweep", str(path), "--out", str(out)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    runs = out / "runs"
    deadline = time.monotonic() + 600  # Ray start-up on a slow, loaded 2-core machine takes minutes
    try:
        # Kill the driver once a trial has checkpointed and before all have finished.
        while time.monotonic() < deadline:
            checkpointed = list(runs.glob("*/checkpoints/step_*"))
            if checkpointed or driver.poll() is not None:
                break
            time.sleep(0.2)
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert checkpointed, "no trial checkpointed in time"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert not _finished_lines(runs)
    _wait_for_orphans(out)

    resumed = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--resume"], env={"COLUMNS": "200"})
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output  # through Tuner.restore (Tune had saved its state)
    names = sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert names == ["countdown-T16-ent-s0", "countdown-T16-vanilla-s0"]
    finished = _finished_lines(runs)
    assert sorted(r["run_dir"] for r in finished) == names  # one finished line per trial: none lost, none twice
    for name in names:
        assert [m["step"] for m in read_jsonl(runs / name / "metrics.jsonl")] == list(range(1, steps + 1))
        assert [e["step"] for e in read_jsonl(runs / name / "eval.jsonl")] == [
            0,
            steps,
        ]  # before training (smoke preset), the end; none twice


def _wait_for_orphans(out: Path, timeout: float = 30.0) -> None:
    """Ray's processes die with the driver (fate sharing); wait until none writes under `out`."""
    temp = (out / ".ray" / "tmp").absolute()
    patterns = [str(temp), str(sweep.temp_link_path(temp))]  # Ray's command lines name one of them
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pattern in patterns
                 for pid in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()]
        if not alive:
            return
        time.sleep(0.5)
    pytest.fail(f"Ray processes of the killed sweep still running: {alive}")


def test_dry_run_lists_every_trial_and_every_problem(tmp_path):
    """`tre sweep main --dry-run` names every trial that cannot start (here HH's, which have no
    reward model), lists the ones that can, and exits non-zero; a real run stops at the first."""
    result = runner.invoke(app, ["sweep", "main", "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("error: ")]
    hh_trials = [t.name for t in sweep.expand_grid(sweep.load_sweep("main")) if t.task == "hh"]
    assert len(problems) == len(hh_trials) == 14
    assert all("has no reward model" in line for line in problems)
    assert all(any(f"trial {name}:" in line for line in problems) for name in hh_trials)
    assert "  math-Qwen2.5-1.5B-Instruct-vanilla-s0" in result.output.splitlines()
    assert "14 of 42 trials cannot start" in result.output
    with pytest.raises(ValueError, match="has no reward model"):
        sweep.plan_sweep("main", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
