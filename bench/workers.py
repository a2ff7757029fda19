"""One run with 1 worker and with 2 (issue 12), side by side: each step's metrics and their gaps,
and the step time of each, on CPU (gloo, one torch thread a worker, as Ray Train's workers).

The 2-worker run starts its workers with tests/workers_harness.py (torch.multiprocessing and a
gloo process group calling the entry Ray Train calls, trainer.job.worker_main, without Ray);
the 1-worker run is `trainer.run` in a child process with one thread. Also a 1-worker run with 2 threads: what the
same 2 cores give one process.

    python bench/workers.py                        # the shipped testbed, smoke preset, 3 steps
    python bench/workers.py --method forking-tokens --set method.scope=global --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

# The tests' launcher of a run's workers without Ray (torch.multiprocessing + gloo, worker_main).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from workers_harness import run_workers_locally  # noqa: E402

COMPARED = ("reward/mean", "response/length_mean", "actor/p_max", "actor/entropy", "actor/pg_loss",
            "actor/ppo_kl", "critic/vf_loss", "actor/grad_norm")


def _one(config_dict: dict, threads: int) -> None:
    import torch

    from tre_cli import trainer
    from tre_cli.config import from_dict

    torch.set_num_threads(threads)
    trainer.run(from_dict(config_dict, "bench"))


def run(config, out: Path, workers: int, threads: int = 1) -> list[dict]:
    import torch.multiprocessing as mp

    from tre_cli.config import to_dict, with_overrides

    config = with_overrides(config, {"run.out": str(out), "run.workers": workers})
    if workers == 1:
        child = mp.get_context("spawn").Process(target=_one, args=(to_dict(config), threads))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"the 1-worker run failed (exit {child.exitcode})")
    else:
        run_workers_locally(config, out, workers)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--method", default="tre-p")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()

    from tre_cli.config import resolve

    config = resolve(task="countdown", method=args.method, model=args.model, preset=args.preset,
                     overrides=[f"ppo.steps={args.steps}", "eval.every=0", "eval.before_train=false", "eval.limit=8",
                                "eval.n_samples=1", "run.save_every=0", "run.wandb.mode=disabled", *args.sets])
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    runs = {
        "1 worker, 1 thread": run(config, root / "one", 1),
        "2 workers, 1 thread each": run(config, root / "two", 2),
        "1 worker, 2 threads": run(config, root / "one-2t", 1, threads=2),
    }
    one, two = runs["1 worker, 1 thread"], runs["2 workers, 1 thread each"]
    print(f"\n{args.method}, {args.model}, preset {args.preset} + {args.sets}, {args.steps} steps")
    print("\n| metric | step | 1 worker | 2 workers | relative gap |\n|---|---|---|---|---|")
    worst: dict[str, float] = {}
    for a, b in zip(one, two, strict=True):
        for key in COMPARED:
            if key in a and key in b:
                gap = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
                worst[key] = max(worst.get(key, 0.0), gap)
                print(f"| {key} | {a['step']} | {a[key]:.6g} | {b[key]:.6g} | {gap:.1e} |")
    print("\nlargest relative gap per metric: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    print("\n| run | step time, s (median over steps) | per step |\n|---|---|---|")
    for name, records in runs.items():
        times = [r["timing/step_s"] for r in records]
        print(f"| {name} | {statistics.median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} |")


if __name__ == "__main__":
    main()
