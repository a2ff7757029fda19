"""`make gpu-check`: everything a lent GPU should measure, in one command and one JSON summary.

Meant for one H100/H200 with torch, transformers and triton (no vLLM, Ray or W&B needed), within
about 8 minutes. Checks, most valuable first, each with its own time cap inside a total budget:

1. bf16_check: issue 11's mixed-precision check on the GPU. A small random Qwen2 takes one PPO
   step at actor lr 1e-6 with bf16 compute (fp32 masters) and one with fp32 compute, on the same
   rollouts: the fraction of weights moved (>= 0.9 passes), the gradients' cosine and relative
   difference, and, as the control, the same update applied to weights stored in bf16.
2. ppo_step: PPO steps at Qwen2.5-1.5B's shape (random weights, bench/ppo_shapes.py's model)
   with the hf engine, bf16 compute over fp32 masters and gradient checkpointing: seconds and
   tokens/s per phase and peak memory (the first step, compilation, left out).
3. kernel_tests: tests/test_kernels.py natively (no TRITON_INTERPRET).
4. released_compat: bench/compat_check.py, `released_code_compat` against the released TRE-P
   rule under CUDA autocast, eager and torch.compile(dynamic=True) (issue 23).
5. token_stats: bench/token_stats.py's measurements at N = 4,096 and 16,384 (V = 151,936, bf16,
   forward + backward): us/token, ratio to the copy-bandwidth floor, extra memory, for the fused
   kernels, the torch reference and the released code's approach.

    make gpu-check                                  # = python bench/gpu_check.py --out gpu-check.json
    python bench/gpu_check.py --dry-run --out x.json  # CPU: tiny shapes, the same code paths

Each check runs in a child process of its own, killed at its time cap ("timed out"), whose
memory is the device's again when it exits (the 1.5B PPO step's engine holds a reference cycle
through torch.compile). Each check's failure is recorded (status and the error's last line) and
the others still run; the exit code is 0 only when every check that ran passed. Before any
check, one line names what the kernels need and this machine lacks (pytest for the kernel
tests; a C compiler and Python's headers for Triton to build its launcher).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TOTAL_BUDGET_S = 470
CAPS_S = {"bf16_check": 90, "ppo_step": 240, "kernel_tests": 150, "released_compat": 120, "token_stats": 150}
MODULES = ("torch", "transformers", "triton", "yaml", "safetensors", "pytest")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks a function's module up by name
    spec.loader.exec_module(module)
    return module


def environment() -> dict:
    import torch

    found = {m: importlib.util.find_spec(m) is not None for m in MODULES}
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "modules": found}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def kernel_prerequisites(which=shutil.which, include_dir: str | None = None,
                         has_pytest: bool | None = None) -> list[str]:
    """What the kernel checks need and this machine lacks (empty: nothing): pytest (the kernel
    tests), a C compiler ($CC, cc, gcc or clang) and Python's headers (Python.h), with which
    Triton builds its launcher on first use. `which`, `include_dir`, `has_pytest`: the
    machine's unless given."""
    import sysconfig

    missing = []
    if has_pytest is None:
        has_pytest = importlib.util.find_spec("pytest") is not None
    if not has_pytest:
        missing.append("pytest (pip install pytest)")
    compilers = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    if not any(which(c) for c in compilers):
        missing.append(f"a C compiler ({', '.join(compilers)}: none found; apt-get install gcc)")
    include_dir = include_dir if include_dir is not None else sysconfig.get_paths()["include"]
    if not (Path(include_dir) / "Python.h").is_file():
        missing.append(f"Python's headers ({include_dir}/Python.h; apt-get install python3-dev)")
    return missing


def build_tokenizer(out: Path) -> Path:
    """A small Countdown BPE tokenizer with a chat template (the testbed's recipe; no download),
    in a folder with a config.json, as tre loads tokenizers from model folders."""
    from transformers import Qwen2Config

    from tre_cli.testbed.data import sft_pairs
    from tre_cli.testbed.tokenizer import build_tokenizer as bpe, tokenizer_corpus

    tokenizer = bpe(tokenizer_corpus(sft_pairs(200, 0)), 384)
    tokenizer.save_pretrained(str(out))
    Qwen2Config(vocab_size=len(tokenizer)).save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------------ checks


def _ppo_config(model_dir: Path, device: str, dtype: str, prompts: int, n: int, new_tokens: int, extra=()):
    from tre_cli.config import resolve

    return resolve(
        task="countdown", method="tre-p", model=str(model_dir),
        overrides=[f"run.device={device}", f"model.dtype={dtype}", f"ppo.prompts_per_step={prompts}",
                   f"ppo.rollouts_per_prompt={n}", f"ppo.mini_batch_prompts={prompts}",
                   f"rollout.max_new_tokens={new_tokens}", "rollout.engine=hf", "ppo.max_prompt_length=256",
                   f"task.options.train_size={max(prompts * 4, 8)}", "task.options.test_size=4", "eval.limit=1",
                   "run.wandb.mode=disabled", *extra],
    )


def _gradients_at_step(parts) -> list:
    """The policy's gradients (flattened, float32, in parameter order) as the actor optimizer
    steps: filled in when it does."""
    kept: list = []
    step = parts.actor_opt.step

    def recording_step(*args, **kwargs):
        kept[:] = [p.grad.detach().reshape(-1).float().clone() for p in parts.policy.parameters()]
        return step(*args, **kwargs)

    parts.actor_opt.step = recording_step
    return kept


def bf16_check(device: str, scratch: Path, tokenizer: Path) -> dict:
    import dataclasses

    import torch

    from tre_cli import trainer
    from tre_cli.models import load_policy
    from tre_cli.models.precision import fraction_changed
    from tre_cli.rollout.hf import HFEngine

    model_dir = _load("ppo_shapes").build_model("tiny", str(tokenizer), scratch / "bf16-model")
    runs = {}
    for dtype in ("bf16", "fp32"):
        torch.manual_seed(0)
        parts = trainer.build(_ppo_config(model_dir, device, dtype, 4, 2, 16, ["ppo.actor_lr=1e-6"]))
        # Both sample from their identical fp32 masters: the same rollouts, so only the update differs.
        parts = dataclasses.replace(parts, engine=HFEngine(parts.policy, parts.tokenizer, device=device, seed=0))
        start = {k: v.detach().clone() for k, v in parts.policy.state_dict().items()}
        grads = _gradients_at_step(parts)  # the trainer frees them after its last optimizer step
        metrics = trainer.train_step(parts, 1)
        after = {k: v.detach().clone() for k, v in parts.policy.state_dict().items()}
        grad = torch.cat(grads)
        runs[dtype] = dict(
            start=start,
            after=after,
            grad=grad,
            rollout=(metrics["reward/mean"], metrics["response/length_mean"]),
            param_dtypes=sorted({str(v.dtype) for v in after.values()}),
        )
    bf, fp = runs["bf16"], runs["fp32"]
    cos = torch.nn.functional.cosine_similarity
    delta_bf = torch.cat([(bf["after"][k] - bf["start"][k]).reshape(-1) for k in bf["start"]])
    delta_fp = torch.cat([(fp["after"][k] - fp["start"][k]).reshape(-1) for k in fp["start"]])
    stored = load_policy(model_dir, dtype="bf16", device=device)
    for p, g in zip(stored.parameters(), torch.split(fp["grad"], [p.numel() for p in stored.parameters()])):
        p.grad = g.reshape(p.shape).to(torch.bfloat16)
    before = {k: v.detach().clone() for k, v in stored.state_dict().items()}
    torch.optim.AdamW(stored.parameters(), lr=1e-6, weight_decay=0.0).step()
    result = {
        "same_rollouts": bf["rollout"] == fp["rollout"],
        "master_dtypes": bf["param_dtypes"],
        "moved_frac_bf16_compute": fraction_changed(bf["start"], bf["after"]),
        "moved_frac_fp32": fraction_changed(fp["start"], fp["after"]),
        "grad_cosine": float(cos(bf["grad"], fp["grad"], dim=0)),
        "grad_rel_diff": float((bf["grad"] - fp["grad"]).norm() / fp["grad"].norm()),
        "update_cosine": float(cos(delta_bf, delta_fp, dim=0)),
        "moved_frac_stored_bf16_control": fraction_changed(
            before, {k: v.detach() for k, v in stored.state_dict().items()}
        ),
    }
    result["passed"] = bool(result["moved_frac_bf16_compute"] >= 0.9 and result["grad_cosine"] >= 0.99
                            and result["master_dtypes"] == ["torch.float32"])
    return result


def ppo_step(device: str, scratch: Path, tokenizer: Path, dry_run: bool) -> dict:
    import torch

    from tre_cli import trainer
    from tre_cli.models.precision import precision_of

    shapes = _load("ppo_shapes")
    shape = "tiny" if dry_run else "qwen2.5-1.5b"
    prompts, n, new_tokens, steps = (2, 2, 8, 2) if dry_run else (16, 8, 256, 2)
    started = time.perf_counter()
    model_dir = shapes.build_model(shape, str(tokenizer), scratch / "ppo-model")
    built_s = time.perf_counter() - started
    config = _ppo_config(model_dir, device, "bf16", prompts, n, new_tokens,
                         ["model.gradient_checkpointing=true", "ppo.micro_batch_tokens=16384"])
    torch.manual_seed(0)
    parts = trainer.build(config)
    metrics = [trainer.train_step(parts, step) for step in range(1, steps + 1)]
    precision = precision_of(parts.policy)
    return {
        "shape": shape, "prompts": prompts, "n": n, "max_new_tokens": new_tokens, "model_build_s": built_s,
        "master_dtype": str(next(parts.policy.parameters()).dtype),
        "compute_dtype": str(precision.compute) if precision else None,
        "gradient_checkpointing": bool(getattr(parts.policy, "is_gradient_checkpointing", False)),
        **shapes.summarise(metrics, skip_first=steps > 1),
        "passed": all(torch.isfinite(torch.tensor(m["actor/grad_norm"])) for m in metrics),
    }


def kernel_tests(timeout: float, has_pytest: bool | None = None) -> dict:
    if has_pytest is None:
        has_pytest = importlib.util.find_spec("pytest") is not None
    if not has_pytest:  # a failure, not a skip: the kernels would go unchecked
        return {"error": "pytest is not installed, so the kernel tests cannot run (pip install pytest)",
                "passed": False}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_kernels.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=timeout,
    )
    lines = (out.stdout + out.stderr).strip().splitlines()
    summary = next((line for line in reversed(lines) if " passed" in line or " skipped" in line or " failed" in line
                    or " error" in line), lines[-1] if lines else "")
    summary = summary.strip("= ")
    ran = " passed" in summary or " failed" in summary or " error" in summary
    return {"returncode": out.returncode, "summary": summary, "passed": out.returncode == 0 and " passed" in summary,
            "skipped": None if ran else summary}


def token_stats(device: str, dry_run: bool, deadline: float) -> dict:
    stats = _load("token_stats")
    sizes, vocab, impls, repeats = ([64], 4096, ("reference", "released"), 1) if dry_run else \
        ([4096, 16384], 151_936, ("fused", "reference", "released"), 5)
    rows = []
    for n in sizes:
        floor = stats.run_child(["floor", "synthetic", n, vocab, device, "bfloat16", repeats, 1], False)
        entry = {"n": n, "vocab": vocab, "floor_seconds": floor.get("seconds"), "impls": {}}
        for impl in impls:
            if time.perf_counter() > deadline:
                entry["impls"][impl] = {"status": "skipped: out of time"}
                continue
            row = stats.run_child([impl, "synthetic", n, vocab, device, "bfloat16", repeats, 1], False)
            if row.get("status") == "ok" and floor.get("status") == "ok":
                row = {"status": "ok", "us_per_token": row["seconds"] / n * 1e6,
                       "x_floor": row["seconds"] / floor["seconds"], "extra_mib": row["extra_mib"]}
            entry["impls"][impl] = row
        rows.append(entry)
    ok = all(r.get("status") == "ok" for e in rows for r in e["impls"].values())
    return {"pass": "forward+backward", "dtype": "bfloat16", "sizes": rows, "passed": ok}


# ------------------------------------------------------------------------------------ driver


def _write(summary: dict, started: float, out: str) -> None:
    summary["seconds"] = round(time.perf_counter() - started, 1)
    ran = [c for c in summary["checks"].values() if not c["status"].startswith("skipped")]
    summary["ok"] = bool(ran) and all(c["status"] == "ok" for c in ran)
    Path(out).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def run_check(name: str, device: str, scratch: Path, tokenizer: Path, dry_run: bool, cap: float) -> dict:
    """One check, in this process (what a child process calls)."""
    plan = {
        "bf16_check": lambda: bf16_check(device, scratch, tokenizer),
        "ppo_step": lambda: ppo_step(device, scratch, tokenizer, dry_run),
        "kernel_tests": lambda: kernel_tests(cap),
        "released_compat": lambda: _load("compat_check").run(device, dry_run),
        "token_stats": lambda: token_stats(device, dry_run, time.perf_counter() + cap),
    }
    return plan[name]()


def _child_main(args) -> None:
    """--child: run one check and write its result (or its error) as JSON to --result."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TRE_KERNELS", "1")
    try:
        result = run_check(args.child, "cpu" if args.dry_run else "cuda", Path(args.scratch), Path(args.tokenizer),
                           args.dry_run, args.cap)
    except Exception as error:  # recorded; the other checks still run
        result = {
            "error": f"{type(error).__name__}: {error}".splitlines()[0][:300],
            "traceback_tail": traceback.format_exc().strip().splitlines()[-3:],
            "status": "error",
        }
    Path(args.result).write_text(json.dumps(result, default=str))


def _run(name: str, summary: dict, deadline: float, child_args: list[str], scratch: Path,
         caps: dict[str, float] | None = None) -> None:
    """Check `name` in a child process, killed at its cap (or the time left, if less)."""
    left = deadline - time.perf_counter()
    if left < 10:
        summary["checks"][name] = {"status": "skipped: out of time"}
        return
    cap = min((caps or CAPS_S)[name], left)
    started = time.perf_counter()
    result_file = scratch / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result_file),
               "--cap", str(cap), *child_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Its own session, so that a timeout kills the check's children too (the kernel tests' pytest).
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=cap)
        if result_file.is_file():
            result = json.loads(result_file.read_text())
            status = result.pop("status", None) or (
                f"skipped: {result['skipped']}" if result.get("skipped")
                else ("ok" if result.get("passed") else "failed"))
        else:  # the child died before writing (killed, out of memory, a crash in native code)
            tail = output.strip().splitlines()[-3:]
            result, status = {"error": f"the check's process exited with {child.returncode}",
                              "traceback_tail": tail}, "error"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        result, status = {}, "timed out"
    summary["checks"][name] = {"status": status, "seconds": round(time.perf_counter() - started, 1), **result}
    print(f"{name:14} {summary['checks'][name]['seconds']:7.1f} s  {status}", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON summary")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all checks together")
    parser.add_argument("--only", nargs="*", choices=sorted(CAPS_S), help="run only these checks")
    for internal in ("--child", "--result", "--scratch", "--tokenizer"):  # a check's own process
        parser.add_argument(internal, help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_main(args)
        return {"ok": True}

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per check, not a bar per model load
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here; use --dry-run on a CPU")
    started = time.perf_counter()
    deadline = started + args.budget
    summary = {"dry_run": args.dry_run, "device": device, "environment": environment(), "checks": {}}
    missing = kernel_prerequisites()
    summary["environment"]["kernel_prerequisites_missing"] = missing
    if missing:
        print(f"gpu-check: the kernel checks need {'; '.join(missing)}", flush=True)
    wanted = args.only or list(CAPS_S)
    with tempfile.TemporaryDirectory(prefix="tre-gpu-check-") as tmp:
        scratch = Path(tmp)
        tokenizer = build_tokenizer(scratch / "tokenizer")
        child_args = ["--scratch", str(scratch), "--tokenizer", str(tokenizer)]
        child_args += ["--dry-run"] if args.dry_run else []
        for name in CAPS_S:
            if name in wanted:
                _run(name, summary, deadline, child_args, scratch)
                _write(summary, started, args.out)  # after every check: a killed run keeps what it measured
    _write(summary, started, args.out)
    print(f"gpu-check {'passed' if summary['ok'] else 'FAILED'} in {summary['seconds']} s -> {args.out}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main().get("ok") else 1)
