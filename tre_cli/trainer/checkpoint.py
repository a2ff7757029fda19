"""Checkpoints of a run: `checkpoints/step_<N>/` with the policy (safetensors), the tokenizer,
`trainer.pt` (critic, optimizers, scheduler, RNG states; no critic entries with a critic-free
estimator; the alpha controller's state with method.alpha_control=target) and `state.json`.

`trainer.pt` is read with `torch.load(weights_only=True)`: tensors and plain data only. A run
directory can sit on shared storage; a `trainer.pt` that carries anything else (a pickled
object runs code when it is unpickled) is refused with one line, never loaded.
"""

from __future__ import annotations

import json
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from tre_cli.io import atomic_dir, replace_dir
from tre_cli.tracking import Tracker
from tre_cli.trainer.parts import Parts

TRAINER_STATE = "trainer.pt"
STATE_KEYS = ("critic", "actor_opt", "critic_opt", "critic_sched", "rng")
# what a run without a critic (a critic-free ppo.estimator) saves and needs.
CRITIC_FREE_STATE_KEYS = ("actor_opt", "rng")
ALPHA_STATE = "alpha_control"


def save_checkpoint(parts: Parts, tracker: Tracker, step: int) -> Path:
    target = tracker.run_dir.checkpoint_dir(step)
    with atomic_dir(target) as tmp:
        parts.policy.save_pretrained(tmp / "policy", safe_serialization=True)
        parts.tokenizer.save_pretrained(tmp / "policy")
        torch.save(_trainer_state(parts, {"actor_opt": parts.actor_opt.state_dict(), "rng": _rng_state(parts)}),
                   tmp / TRAINER_STATE)
        (tmp / "state.json").write_text(json.dumps({"step": step}))
    tracker.run_dir.prune_checkpoints(parts.config.run.keep_last)
    return target


def _trainer_state(parts: Parts, state: dict[str, Any]) -> dict[str, Any]:
    """`state` with the critic's entries (when the run has a critic) and the alpha controller's."""
    if parts.critic is not None:
        state = {"critic": parts.critic.state_dict(), **state, "critic_opt": parts.critic_opt.state_dict(),
                 "critic_sched": parts.critic_sched.state_dict()}
    if parts.alpha is not None:
        state[ALPHA_STATE] = parts.alpha.state_dict()
    return state


def _load_alpha(parts: Parts, saved: dict[str, Any], path: Path) -> None:
    if parts.alpha is None:
        return
    if ALPHA_STATE not in saved:
        raise ValueError(f"checkpoint {path} has no alpha controller state (the run's method.alpha_control is target)")
    parts.alpha.load_state_dict(saved[ALPHA_STATE])


def read_trainer_state(checkpoint: Path, critic: bool = True) -> dict[str, Any]:
    """A checkpoint's trainer.pt, on the CPU: tensors and plain data only (see the module docstring).
    `critic`: whether the run has a critic (GAE) whose entries it must hold."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {TRAINER_STATE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"refusing to load {path}: it holds more than tensors and plain data ({reason[:160]})"
        ) from None
    required = STATE_KEYS if critic else CRITIC_FREE_STATE_KEYS
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a tre trainer state (missing {', '.join(missing)})")
    return state


def load_checkpoint(parts: Parts, path: Path, trainer_state: dict[str, Any] | None = None) -> int:
    """Restore the policy, critic, optimizers, scheduler and RNG states of checkpoint `path`;
    returns its step. `trainer_state`: its trainer.pt already read (read_trainer_state)."""
    from safetensors.torch import load_file

    saved = trainer_state if trainer_state is not None else read_trainer_state(path, parts.critic is not None)
    files = sorted((path / "policy").glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f), device=str(parts.device)))
    missing, unexpected = parts.policy.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
    if real_missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the policy (missing {real_missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    parts.actor_opt.load_state_dict(saved["actor_opt"])
    if parts.critic is not None:
        parts.critic.load_state_dict(saved["critic"])
        parts.critic_opt.load_state_dict(saved["critic_opt"])
        parts.critic_sched.load_state_dict(saved["critic_sched"])
    _load_alpha(parts, saved, path)
    _set_rng_state(parts, saved["rng"])
    parts.engine.sync_weights(parts.policy)
    return int(json.loads((path / "state.json").read_text())["step"])


def _rng_state(parts: Parts, cuda: Any = None) -> dict[str, Any]:
    """Python's and torch's RNG states, and the CUDA generator of the device this process trains
    on only: touching every visible GPU would open a CUDA context on each from every worker.
    `cuda`: torch.cuda, or a test's stand-in."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    cuda = torch.cuda if cuda is None else cuda
    if parts.device == "cuda" and cuda.is_available():
        state["cuda"] = cuda.get_rng_state(cuda.current_device())
    # No engine state: sampling noise is a function of (run seed, step, sequence).
    return state


def _set_rng_state(parts: Parts, state: dict[str, Any], cuda: Any = None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = torch.cuda if cuda is None else cuda
    if "cuda" in state and parts.device == "cuda" and cuda.is_available():
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):  # written by get_rng_state_all: one state a visible GPU
            saved = saved[cuda.current_device()] if cuda.current_device() < len(saved) else None
        if saved is not None:
            cuda.set_rng_state(saved, cuda.current_device())


# ----------------------------------------------------------------------------- workers


def _unsharded_class_name(module: torch.nn.Module) -> str:
    """The model's own class name under FSDP2's generated FSDP<Name> subclass."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(module).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls.__name__
    return type(module).__name__


def save_checkpoint_workers(parts: Parts, tracker: Tracker | None, step: int) -> Path:
    """A checkpoint of a run of several workers (a collective; `tracker`: rank 0's, else None):
    `sharded/` (torch.distributed.checkpoint: policy, critic and both optimizers, each worker its
    shards), `workers.pt` (critic scheduler, RNG states), a consolidated safetensors policy and the
    tokenizer (rank 0: what `tre eval` and resuming with weights only read) and `state.json`."""
    from tre_cli.trainer import distributed

    workers = parts.workers
    target = tmp = None
    if workers.main:
        target = tracker.run_dir.checkpoint_dir(step)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    target, tmp = distributed.broadcast_object((target, tmp))
    modules, optimizers = _sharded_parts(parts)
    distributed.save_sharded(tmp, modules, optimizers)
    policy_state = distributed.full_state_dict(parts.policy, rank0_cpu=True)
    if workers.main:
        if getattr(parts.policy.config, "tie_word_embeddings", False):
            # Gathered tensors are separate copies, so save_pretrained cannot see the tie; the
            # single-process checkpoint has no lm_head.weight either.
            policy_state.pop("lm_head.weight", None)
        parts.policy.save_pretrained(tmp / "policy", state_dict=policy_state, safe_serialization=True)
        config_file = tmp / "policy" / "config.json"
        config = json.loads(config_file.read_text())
        config["architectures"] = [_unsharded_class_name(parts.policy)]
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        parts.tokenizer.save_pretrained(tmp / "policy")
        state = {"rng": _rng_state(parts)}
        if parts.critic_sched is not None:
            state["critic_sched"] = parts.critic_sched.state_dict()
        if parts.alpha is not None:
            state[ALPHA_STATE] = parts.alpha.state_dict()
        torch.save(state, distributed.workers_state_path(tmp))
        (tmp / "state.json").write_text(json.dumps({"step": step, "workers": workers.world}))
        replace_dir(tmp, target)
        tracker.run_dir.prune_checkpoints(parts.config.run.keep_last)
    distributed.barrier()
    return target


def load_checkpoint_workers(parts: Parts, path: Path) -> int:
    """Restore a save_checkpoint_workers checkpoint into parts built and sharded alike (the same
    number of workers or another: torch.distributed.checkpoint reshards); returns its step."""
    from tre_cli.trainer import distributed

    if not distributed.is_sharded_checkpoint(path):
        raise ValueError(f"checkpoint {path} was written by one process (no {distributed.SHARDED_DIR}/); "
                         f"resume it with run.workers=1")
    modules, optimizers = _sharded_parts(parts)
    distributed.load_sharded(path, modules, optimizers)
    try:
        saved = torch.load(distributed.workers_state_path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"refusing to load {distributed.workers_state_path(path)}: it holds more than "
                         f"tensors and plain data ({str(error).strip()[:160]})") from None
    if parts.critic_sched is not None:
        parts.critic_sched.load_state_dict(saved["critic_sched"])
    _load_alpha(parts, saved, path)
    _set_rng_state(parts, saved["rng"])
    parts.engine.sync_weights(distributed.stream_full_state(parts.policy))
    return int(json.loads((path / "state.json").read_text())["step"])


def _sharded_parts(parts: Parts) -> tuple[dict[str, Any], dict[str, Any]]:
    """The modules and optimizers a sharded checkpoint holds (no critic without one)."""
    modules: dict[str, Any] = {"policy": parts.policy}
    optimizers: dict[str, Any] = {"actor_opt": (parts.policy, parts.actor_opt)}
    if parts.critic is not None:
        modules["critic"] = parts.critic
        optimizers["critic_opt"] = (parts.critic, parts.critic_opt)
    return modules, optimizers
