"""Where one PPO step's time goes on a real model (issue 13): per phase, wall-clock seconds and
this process's CPU seconds, for steps of `tre run` with the given preset and --set overrides.

CPU seconds matter on a shared machine: wall time there measures the other processes too, while
CPU seconds / threads is what the step would take alone (a lower bound: perfect parallelism).

    python bench/small_step.py --model /tmp/smollm2 --preset small --steps 1
    python bench/small_step.py --model /tmp/smollm2 --preset small --set rollout.engine=hf
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from tre_cli.trainer.progress import Phases


class TimedPhases(Phases):
    """Records wall and CPU seconds of every phase the trainer reports."""

    def __init__(self) -> None:
        self.open: dict[str, tuple[float, float]] = {}
        self.seconds: dict[str, dict[str, float]] = {}

    def start(self, phase: str, total: int, unit: str) -> None:
        self.open[phase] = (time.perf_counter(), time.process_time())

    def done(self, phase: str) -> None:
        wall, cpu = self.open.pop(phase)
        entry = self.seconds.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] += time.perf_counter() - wall
        entry["cpu_s"] += time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="tre-p")
    parser.add_argument("--task", default="countdown")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()

    import torch

    from tre_cli import trainer
    from tre_cli.config import resolve
    from tre_cli.trainer.parts import seed_everything
    from tre_cli.trainer.progress import quiet_transformers

    quiet_transformers()
    out = tempfile.mkdtemp(prefix="small-step-")
    config = resolve(task=args.task, method=args.method, model=args.model, preset=args.preset,
                     overrides=[f"run.out={out}", "run.wandb.mode=disabled", *args.sets])
    seed_everything(config.run.seed)
    started = time.perf_counter()
    parts = trainer.build(config)
    print(f"build {time.perf_counter() - started:.1f}s; torch threads {torch.get_num_threads()}; "
          f"{config.ppo.prompts_per_step} prompts x {config.ppo.rollouts_per_prompt}, "
          f"T {config.rollout.max_new_tokens}, engine {config.rollout.engine}, "
          f"micro_batch_tokens {config.ppo.micro_batch_tokens}")
    for step in range(1, args.steps + 1):
        phases = TimedPhases()
        cpu = time.process_time()
        metrics = trainer.train_step(parts, step, phases)
        cpu = time.process_time() - cpu
        row = {"step": step, "step_wall_s": round(metrics["timing/step_s"], 1), "step_cpu_s": round(cpu, 1),
               **{f"{phase}/{kind}": round(value, 1) for phase, entry in phases.seconds.items()
                  for kind, value in entry.items()},
               **{key: round(metrics[key], 3) for key in ("timing/gen_s", "timing/old_logprob_values_s",
                                                          "timing/update_s", "reward/mean", "response/length_mean",
                                                          "response/truncated_frac", "perf/response_tokens")}}
        print(json.dumps(row))
    parts.engine.close()


if __name__ == "__main__":
    main()
