"""The PPO trainer: `run(config) -> RunResult`, for `tre run`, `tre sweep` trials and tests alike.

    parts.py       what a run builds once (task, data, models, engine, optimizers, objective)
    step.py        one PPO step: rollouts, scoring, GAE, the mini-batch updates
    checkpoint.py  checkpoints and resuming (weights-only loading)
    progress.py    the per-step line and the live bar
    job.py         a whole run, a resume, `tre eval`
"""

from tre_cli.trainer.job import StepCallback, evaluate_model, resume, run, run_eval
from tre_cli.trainer.parts import Parts, build, encode_prompt, step_examples
from tre_cli.trainer.step import ppo_update, train_step

__all__ = [
    "Parts",
    "StepCallback",
    "build",
    "encode_prompt",
    "evaluate_model",
    "ppo_update",
    "resume",
    "run",
    "run_eval",
    "step_examples",
    "train_step",
]
