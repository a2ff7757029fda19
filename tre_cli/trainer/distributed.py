"""Data-parallel workers of one run: what a worker does beyond a single process.

`run.workers = N > 1`: N processes (Ray Train's TorchTrainer starts them, see
cluster/workers.run_workers; this module needs only an initialised torch.distributed process
group: gloo on CPU, NCCL on CUDA) train one run together:

- Policy, critic (and the frozen reference) are sharded with FSDP2 (`fully_shard` on every
  decoder layer, then the root; `MixedPrecisionPolicy(param_dtype=compute dtype,
  reduce_dtype=float32)`): fp32 masters and Adam state live in shards, gradients are
  reduce-scattered in fp32. Every micro-batch's loss is already its share of the whole
  mini-batch's (losses.ppo.aggregate_share with the mini-batch's totals), so the gradient wanted
  is the sum over workers, not FSDP's mean: each worker backwards its loss times the number of
  workers (`loss_scale`). (FSDP2's `set_gradient_divide_factor(1.0)` says the same more
  directly, but reduces with PREMUL_SUM, which gloo does not support: "Cannot use
  ReduceOp.PREMUL_SUM with Gloo", torch 2.13.)
- Rollouts: worker r generates a contiguous share of the step's prompts, from its own unsharded
  copy of the policy in the compute dtype (one engine per worker, weights gathered from the
  shards after each update); per-sequence seeding (rollout.hf) makes the samples those of one
  worker. The token lists are gathered, so every worker holds the whole step's rollout, scores
  and advantages (GAE and whitening see the whole batch, as with one worker).
- No-grad passes (old log-probs, values, the selectors' scores) and the updates split every set
  of rows into contiguous shares; a worker with fewer micro-batches runs empty ones (mask 0),
  since every FSDP forward and backward is a collective all workers must join. Results of the
  no-grad passes are summed across workers into whole-batch tensors, so Forking-Tokens and
  KL-Cov select over the whole mini-batch (or its selection groups) as with one worker.
- Metrics are token-weighted means over every worker's micro-batches; only rank 0 writes the
  run directory, the results store and W&B, and evaluates (with its engine copy).
- Checkpoints: torch.distributed.checkpoint (sharded, `sharded/`) for policy, critic and both
  optimizers, plus a consolidated safetensors policy from rank 0 (what `tre eval` loads).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# What a worker asks of Ray in CPUs; it pins its torch threads to it too (trainer.job.worker_main).
from tre_cli.cluster import CPUS_PER_WORKER  # noqa: F401

SHARDED_DIR = "sharded"
WORKERS_STATE = "workers.pt"
# A test hook (like the sweep's TRE_SWEEP_FAIL_ONCE_AT_STEP): "RANK:STEP" makes that worker exit
# abruptly (os._exit(1)) when it starts that step, as a crashed or killed worker would;
# "RANK:STEP:once" only the first time in a run directory (it leaves EXITED_ONCE_MARKER there).
EXIT_AT_ENV = "TRE_WORKER_EXIT_AT"
EXITED_ONCE_MARKER = ".worker-exited-once"
@dataclass(frozen=True)
class Workers:
    """This process's place among the run's workers."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1


SINGLE = Workers()


def current_workers() -> Workers:
    if dist.is_available() and dist.is_initialized():
        return Workers(dist.get_rank(), dist.get_world_size())
    return SINGLE


def share(n: int, workers: Workers) -> range:
    """This worker's contiguous share of n items (the first n % world workers get one more)."""
    base, extra = divmod(n, workers.world)
    start = workers.rank * base + min(workers.rank, extra)
    return range(start, start + base + (1 if workers.rank < extra else 0))


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over the workers (a new tensor on `tensor`'s device)."""
    moved = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.to(tensor.device)


def all_max(value: int) -> int:
    t = torch.tensor([int(value)], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def merge_weighted_means(sums: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Every worker's weighted sums and weights, added key by key: the weighted means over all."""
    total_sums: dict[str, float] = {}
    total_weights: dict[str, float] = {}
    for their_sums, their_weights in all_gather_objects((sums, weights)):
        for key, value in their_sums.items():
            total_sums[key] = total_sums.get(key, 0.0) + value
            total_weights[key] = total_weights.get(key, 0.0) + their_weights[key]
    return {k: total_sums[k] / total_weights[k] for k in sorted(total_sums) if total_weights[k] > 0}


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a gradient norm of sharded parameters), else the tensor itself."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


# ----------------------------------------------------------------------------- FSDP2


def _decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard_module(module: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer its own unit, a critic's value head its own float32
    unit, the rest (embeddings, final norm, LM head) the root's; parameters gathered in the
    compute dtype (the value head's in float32: `ValueModel` computes it in float32 on a float32
    input), gradients reduced in float32 and averaged over workers by FSDP (hence `loss_scale`:
    see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in _decoder_layers(module):
        fully_shard(layer, mp_policy=policy)
    head = getattr(module, "value_head", None)
    if isinstance(head, torch.nn.Module):
        fully_shard(head, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    fully_shard(module, mp_policy=policy)
    return module


def loss_scale(workers: Workers) -> float:
    """What a worker multiplies its loss by so that FSDP's mean of gradients is their sum."""
    return float(workers.world)


def full_state_dict(module: torch.nn.Module, *, rank0_cpu: bool = False) -> dict[str, torch.Tensor]:
    """A sharded module's whole state dict (a collective): on every worker, or (`rank0_cpu`) on
    rank 0's CPU only (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_cpu))


def stream_full_state(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A sharded module's whole state, one tensor at a time (a collective: every worker walks
    the same names in the same order): (name, full tensor) pairs, each gathered from its shards
    only when asked for. What a rollout engine's weight sync reads, so a worker never holds more
    than one whole parameter beyond its shards (for a 7B policy, the embedding's 545M values
    instead of all 7.6e9: full_state_dict would gather 30 GB of fp32 on every GPU). The plain
    state_dict() on purpose: FSDP2's hooks give the sharded parameters that the optimizer
    stepped, where state_dict(keep_vars=True) handed the root unit's stale unsharded ones to the
    engine. A tied embedding is therefore gathered under both its names."""
    for name, tensor in module.state_dict().items():
        yield name, local_tensor(tensor).detach()


# ----------------------------------------------------------------------------- rollouts


def gather_samples(local: Any, n_local: int) -> tuple[list[list[int]], list[list[float]]]:
    """Every worker's samples (token ids and behaviour log-probs of its Rollout, or none), in
    rank order: the step's samples in sequence order."""
    responses: list[list[int]] = []
    logprobs: list[list[float]] = []
    if local is not None:
        lengths = local.response_lengths.tolist()
        responses = [local.response_ids[row, :length].tolist() for row, length in enumerate(lengths)]
        logprobs = [local.logprobs[row, :length].tolist() for row, length in enumerate(lengths)]
    if len(responses) != n_local:
        raise RuntimeError(f"worker generated {len(responses)} samples, expected {n_local}")
    all_responses: list[list[int]] = []
    all_logprobs: list[list[float]] = []
    for their_responses, their_logprobs in all_gather_objects((responses, logprobs)):
        all_responses.extend(their_responses)
        all_logprobs.extend(their_logprobs)
    return all_responses, all_logprobs


# ----------------------------------------------------------------------------- checkpoints


def save_sharded(directory: Path, modules: dict[str, torch.nn.Module],
                 optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> None:
    """Every worker writes its shards of the modules and optimizers under directory/sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {name: get_model_state_dict(module) for name, module in modules.items()}
    for name, (module, optimizer) in optimizers.items():
        state[name] = get_optimizer_state_dict(module, optimizer)
    dcp.save(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))


def load_sharded(directory: Path, modules: dict[str, torch.nn.Module],
                 optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> None:
    """The inverse of save_sharded (into modules and optimizers built and sharded alike)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state: dict[str, Any] = {name: get_model_state_dict(module) for name, module in modules.items()}
    for name, (module, optimizer) in optimizers.items():
        state[name] = get_optimizer_state_dict(module, optimizer)
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))
    for name, module in modules.items():
        set_model_state_dict(module, state[name])
    for name, (module, optimizer) in optimizers.items():
        set_optimizer_state_dict(module, optimizer, state[name])


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / SHARDED_DIR).is_dir()


def exit_if_asked(step: int, workers: Workers, run_dir: Path) -> None:
    """The EXIT_AT_ENV test hook: this worker dies abruptly at the start of that step."""
    text = os.environ.get(EXIT_AT_ENV, "").strip()
    if not text:
        return
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "once"):
            raise ValueError
        rank, at = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"{EXIT_AT_ENV} must be RANK:STEP or RANK:STEP:once, got {text!r}") from None
    if rank != workers.rank or step != at:
        return
    if len(parts) == 3:
        marker = Path(run_dir) / EXITED_ONCE_MARKER
        if marker.exists():
            return
        marker.write_text(f"{step}\n")
    os._exit(1)


def workers_state_path(directory: Path) -> Path:
    return Path(directory) / WORKERS_STATE


__all__: Sequence[str] = (
    "EXIT_AT_ENV", "SINGLE", "Workers", "all_gather_objects", "all_max", "all_reduce_sum", "barrier",
    "broadcast_object", "current_workers", "full_state_dict", "gather_samples", "is_sharded_checkpoint",
    "load_sharded", "local_tensor", "merge_weighted_means", "save_sharded", "shard_module", "share",
    "stream_full_state",
)
