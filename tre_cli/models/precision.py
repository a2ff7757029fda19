"""Mixed precision as the paper's released code (verl with FSDP) trains: fp32 masters, bf16 compute.

- Parameters, their gradients and the optimizer state stay in float32 (the masters). At the
  paper's actor learning rate of 1e-6 an Adam step is about 1e-6 per weight, far below bf16's
  spacing near a typical weight (about 1e-4 at |w| = 0.02): a model stored in bf16 and stepped in
  place keeps almost every weight where it was (measured: 0.8% of the weights move in a step).
- Forward and backward run in the compute dtype (`model.dtype`: bf16 on CUDA by default) through
  `torch.autocast`: matmuls read bf16 casts of the fp32 masters, and autograd returns float32
  gradients to the float32 leaves. verl's FSDP `MixedPrecision(param_dtype=bf16)` instead casts
  the parameters themselves to bf16 for the whole forward; autocast also keeps normalisation,
  softmax and reductions in float32. Both are "fp32 masters, bf16 matmuls"; autocast needs no
  wrapper around the model and keeps `save_pretrained` writing the masters.
- The critic's value head always computes in float32 (`ValueModel`): values feed GAE and a
  squared loss, where bf16 rounding of V would be noise of the size of the advantages.
- Rollout engines get the weights cast to the compute dtype (`engine_state_dict`): vLLM holds its
  own bf16 copy; the hf engine samples from a bf16 copy of the policy when the masters are fp32.
- Token statistics (log-probs, entropies, regions) are computed outside autocast, in float32
  from the bf16 logits (the tre_cli.losses.stats contract).

A module is told its compute dtype once (`set_compute_precision`, done by `load_policy` /
`load_critic` when asked for a compute dtype); `autocast_for(module)` is then the context every
forward of that module runs in. The mapping is weak: it never keeps a module alive.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

MASTER_DTYPE = torch.float32


@dataclass(frozen=True)
class Precision:
    """Where the numbers live: `params` (masters, gradients, optimizer state) and `compute`
    (the dtype of the forward and backward matmuls) on a `device_type` ("cpu", "cuda")."""

    params: torch.dtype
    compute: torch.dtype
    device_type: str

    @property
    def mixed(self) -> bool:
        return self.compute != self.params

    def autocast(self):
        """The context a forward runs in: autocast to `compute` when it differs from `params`."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute)


def training_precision(compute: torch.dtype, device: str | torch.device) -> Precision:
    """fp32 masters with `compute` matmuls on `device`. fp16 is refused: without loss scaling its
    gradients underflow, and neither the paper nor verl trains in fp16."""
    if compute == torch.float16:
        raise ValueError("model.dtype=fp16 cannot train (fp16 gradients underflow without loss scaling); "
                         "use bf16 (fp32 master weights, bf16 compute) or fp32")
    if compute not in (torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported compute dtype {compute} for training; use bf16 or fp32")
    return Precision(params=MASTER_DTYPE, compute=compute, device_type=torch.device(device).type)


_PRECISION: weakref.WeakKeyDictionary[nn.Module, Precision] = weakref.WeakKeyDictionary()


def set_compute_precision(module: nn.Module, precision: Precision) -> None:
    """Record that `module`'s forwards run in `precision.compute` (see `autocast_for`)."""
    _PRECISION[module] = precision


def precision_of(module: nn.Module) -> Precision | None:
    return _PRECISION.get(module)


def autocast_for(module: nn.Module):
    """The autocast context for a forward of `module`: its recorded compute dtype, or nothing
    (the module computes in its parameters' dtype)."""
    precision = precision_of(module)
    return precision.autocast() if precision is not None else contextlib.nullcontext()


def float_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of the module's floating-point parameters (the first one found)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    raise ValueError("module has no floating-point parameters")


def engine_state_dict(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs with floating-point tensors cast to a rollout engine's dtype (detached;
    integer buffers unchanged). One tensor at a time: the cast copies exist only as long as the
    consumer keeps them."""
    items = state.items() if hasattr(state, "items") else state
    for name, tensor in items:
        tensor = tensor.detach()
        yield name, tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def fraction_changed(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """The fraction of all floating-point elements that differ between two state dicts (the
    "did the step move the weights" measure of the bf16 check)."""
    changed = total = 0
    for name, old in before.items():
        if not old.is_floating_point():
            continue
        new = after[name]
        changed += int((new.to(old.dtype) != old).sum())
        total += old.numel()
    return changed / max(total, 1)
