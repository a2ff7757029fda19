"""`make gpu-check` (bench/gpu_check.py) in its CPU dry-run mode: every check runs its code path at
tiny shapes and lands in one JSON summary (issue 11, item 10)."""

from __future__ import annotations

import json
import sys

import pytest

from bench_scripts import load_bench


def _gpu_check():
    return load_bench("gpu_check")


def test_the_budget_fits_eight_minutes():
    module = _gpu_check()
    assert module.TOTAL_BUDGET_S <= 480
    assert list(module.CAPS_S) == ["bf16_check", "ppo_step", "kernel_tests", "released_compat", "token_stats"]


@pytest.mark.slow
def test_dry_run_writes_one_summary(tmp_path, capsys):
    out = tmp_path / "gpu-check.json"
    summary = _gpu_check().main(["--dry-run", "--out", str(out), "--budget", "900"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary, default=str))
    checks = summary["checks"]
    assert (
        summary["dry_run"]
        and summary["device"] == "cpu"
        and set(checks) == {"bf16_check", "ppo_step", "kernel_tests", "released_compat", "token_stats"}
    )
    bf16 = checks["bf16_check"]
    assert bf16["status"] == "ok" and bf16["same_rollouts"] and bf16["master_dtypes"] == ["torch.float32"]
    assert bf16["moved_frac_bf16_compute"] >= 0.9 and bf16["moved_frac_stored_bf16_control"] < 0.1
    ppo = checks["ppo_step"]
    assert ppo["status"] == "ok" and ppo["shape"] == "tiny" and ppo["gradient_checkpointing"]
    assert ppo["master_dtype"] == "torch.float32" and ppo["compute_dtype"] == "torch.bfloat16"
    assert ppo["phases"]["update"]["seconds"] > 0 and ppo["steps"] == 1
    # No Triton in the test venv: the kernel tests skip themselves; the others measure.
    assert checks["kernel_tests"]["status"].startswith(("skipped", "ok"))
    compat = checks["released_compat"]
    assert compat["status"] == "ok" and compat["worst_agreement"] >= 0.995, compat
    stats = checks["token_stats"]
    assert stats["status"] == "ok", stats
    assert set(stats["sizes"][0]["impls"]) == {"reference", "released"}
    assert all(row["x_floor"] > 0 for row in stats["sizes"][0]["impls"].values())
    assert summary["ok"] is True
    assert "gpu-check passed" in capsys.readouterr().out


def _compat_check(monkeypatch):
    check = load_bench("compat_check")
    monkeypatch.setitem(sys.modules, "compat_check", check)  # torch.compile looks modules up by name
    return check


@pytest.mark.slow
def test_compat_check_dry_run_compares_compat_mode_with_the_released_rule(monkeypatch):
    """bench/compat_check.py on a CPU: the released rule (eager and through dynamo) against
    `released_code_compat` on every (V, P) group, every row agreeing."""
    check = _compat_check(monkeypatch)
    result = check.run("cpu", dry_run=True)
    assert result["passed"] and result["worst_agreement"] == 1.0, result
    groups = result["groups"]
    assert {(g["vocab"], g["p"]) for g in groups} == {(v, p) for v, _ in check.DRY_GROUPS for p in (0.9, 0.99, 0.999)}
    for g in groups:
        assert g["eager"]["agree"] == g["compiled"]["agree"] == g["rows"]


def test_compat_check_fails_when_compat_mode_differs(monkeypatch):
    """A compat nucleus capped at 128 instead of 256 disagrees on the rows whose released
    nucleus is longer, and no near-tie explains them: the check fails."""
    from tre_cli.losses import stats

    check = _compat_check(monkeypatch)
    monkeypatch.setattr(check, "P_VALUES", (0.99,))
    monkeypatch.setattr(check, "DRY_GROUPS", ((4_096, 48),))
    monkeypatch.setattr(stats, "RELEASED_CODE_TOP", 128)
    result = check.run("cpu", dry_run=True)
    eager = result["groups"][0]["eager"]
    assert not result["passed"] and eager["size_differs"] > 0 and eager["explained_near_ties"] == 0, result


def test_what_the_kernels_need_is_named_up_front(tmp_path):
    module = _gpu_check()
    (tmp_path / "Python.h").write_text("")
    assert module.kernel_prerequisites(which=lambda name: f"/usr/bin/{name}", include_dir=str(tmp_path),
                                       has_pytest=True) == []
    missing = module.kernel_prerequisites(which=lambda name: None, include_dir=str(tmp_path / "none"),
                                          has_pytest=False)
    assert [m.split(" ")[0] for m in missing] == ["pytest", "a", "Python's"]
    assert "C compiler" in missing[1] and "Python.h" in missing[2]


def test_the_kernel_tests_without_pytest_fail_instead_of_skipping():
    result = _gpu_check().kernel_tests(60, has_pytest=False)
    assert result["passed"] is False and "pytest is not installed" in result["error"] and "skipped" not in result


def test_a_check_runs_in_its_own_process_and_is_killed_at_its_cap(tmp_path):
    """The cap is enforced: the check's process (importing torch takes longer) is killed."""
    import time

    module = _gpu_check()
    summary = {"checks": {}}
    started = time.perf_counter()
    module._run("bf16_check", summary, started + 600, ["--dry-run"], tmp_path, caps={"bf16_check": 0.5})
    assert summary["checks"]["bf16_check"]["status"] == "timed out"
    assert time.perf_counter() - started < 30
