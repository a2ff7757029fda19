"""A PPO step under GAE (policy + critic) and under a critic-free estimator (issue 21), side by
side in one run: wall and CPU seconds per phase and the peak resident memory of each process.

Each (estimator, repeat) is its own process (resident memory is per process), and the
estimators alternate (gae, grpo, gae, grpo, ...) so a load change on a shared machine falls on
both. Step 1 of each process is reported apart from the later ones (it pays first-call costs).

    python bench/estimators.py --model testbed --preset smoke --steps 2 --repeats 2
    python bench/estimators.py --model /tmp/smollm2 --preset small --steps 2 --repeats 2 \\
        --set task.options.format_score=0.1 --set "task.options.response_prefix=<think>\\n</think>\\n<answer>" \\
        --set "rollout.stop=['</answer>']"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PHASE_KEYS = ("timing/gen_s", "timing/old_logprob_values_s", "timing/update_s", "timing/step_s")


def child(args: argparse.Namespace) -> None:
    """One process: build with the estimator, train `steps` steps, print one JSON line a step."""
    from tre_cli import trainer
    from tre_cli.config import resolve
    from tre_cli.trainer.parts import seed_everything
    from tre_cli.trainer.progress import quiet_transformers

    quiet_transformers()
    out = tempfile.mkdtemp(prefix="bench-estimators-")
    config = resolve(task=args.task, method=args.method, model=args.model, preset=args.preset,
                     overrides=[f"run.out={out}", "run.wandb.mode=disabled", f"ppo.estimator={args.estimator}",
                                *args.sets])
    seed_everything(config.run.seed)
    started = time.perf_counter()
    parts = trainer.build(config)
    build_s = time.perf_counter() - started
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for step in range(1, args.steps + 1):
        cpu = time.process_time()
        metrics = trainer.train_step(parts, step)
        print(json.dumps({"estimator": args.estimator, "step": step, "build_s": round(build_s, 1),
                          "cpu_s": round(time.process_time() - cpu, 2),
                          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                          "built_rss_mib": round(rss_built),
                          "critic": parts.critic is not None,
                          "response_tokens": metrics["perf/response_tokens"],
                          **{k: round(metrics[k], 2) for k in PHASE_KEYS}}), flush=True)
    parts.engine.close()


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.1f}" if abs(high - low) < 0.05 else f"{low:.1f}-{high:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--method", default="tre-p")
    parser.add_argument("--task", default="countdown")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--estimators", default="gae,grpo")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--estimator", default="gae", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    estimators = args.estimators.split(",")
    rows: list[dict] = []
    for repeat in range(args.repeats):
        for estimator in estimators:
            command = [sys.executable, __file__, "--child", "--estimator", estimator, "--model", args.model,
                       "--method", args.method, "--task", args.task, "--preset", args.preset,
                       "--steps", str(args.steps), *[f"--set={item}" for item in args.sets]]
            load = os.getloadavg()[0]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{estimator}: failed\n{done.stderr[-3000:]}")
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    row = {**json.loads(line), "repeat": repeat, "load_1min": round(load, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    print(f"\nmodel {args.model}, preset {args.preset}, method {args.method}; later steps = steps 2..{args.steps}")
    print("| estimator | critic | update s | old log-probs (+ values) s | generate s | step s | step CPU s "
          "| peak RSS MiB | step-1 step s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for estimator in estimators:
        mine = [r for r in rows if r["estimator"] == estimator]
        later = [r for r in mine if r["step"] > 1] or mine
        first = [r for r in mine if r["step"] == 1]
        print(f"| {estimator} | {'yes' if mine[0]['critic'] else 'no'} "
              f"| {_span([r['timing/update_s'] for r in later])} "
              f"| {_span([r['timing/old_logprob_values_s'] for r in later])} "
              f"| {_span([r['timing/gen_s'] for r in later])} | {_span([r['timing/step_s'] for r in later])} "
              f"| {_span([r['cpu_s'] for r in later])} | {_span([r['peak_rss_mib'] for r in mine])} "
              f"| {_span([r['timing/step_s'] for r in first])} |")
    if len(estimators) == 2:
        a, b = estimators
        for key in ("timing/update_s", "timing/step_s", "cpu_s"):
            pairs = [(x[key], y[key]) for x in rows for y in rows
                     if x["estimator"] == a and y["estimator"] == b and x["repeat"] == y["repeat"]
                     and x["step"] == y["step"] and x["step"] > 1]
            ratios = [x / y for x, y in pairs if y > 0]
            if ratios:
                print(f"{key} {a}/{b}: {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} paired later steps")


if __name__ == "__main__":
    main()
