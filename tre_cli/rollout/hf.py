"""The `hf` engine: batched sampling with a transformers model and our own decoding loop.

Our own loop (rather than `generate`) because the behaviour log-prob of each sampled token must
be exactly log softmax(logits / temperature) over the full vocabulary, the quantity the trainer
recomputes, and `generate` would have to keep every step's full logits to give it.

On CUDA the loop uses a static KV cache and a compiled one-token decoding step with CUDA graphs:
plain eager decoding is launch-bound (about 80 ms a step whatever the batch on an H100), which
starves PPO. On CPU it runs eagerly with a dynamic cache.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from tre_cli.rollout.base import (
    EngineBase,
    Progress,
    Rollout,
    Weights,
    assemble_rollout,
    check_generate_args,
    eos_token_ids_of,
    left_pad,
    position_ids_from_mask,
)

# Static caches are sized up to a multiple of this, so that nearby prompt widths and response
# budgets reuse one compiled graph instead of recompiling.
STATIC_CACHE_BUCKET = 256


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 tensors holding 32-bit values, without int64 overflow
    (the product is split at 16 bits), so the result is the same on every device."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32 constants) of int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _fold(value: int) -> int:
    """A Python int of any size folded to 32 bits (hashed word by word)."""
    value = int(value)
    if value < 0:
        raise ValueError(f"sampling keys must be >= 0, got {value}")
    folded = 0
    while True:
        folded = int(_mix32(torch.tensor(folded ^ (value & _MASK32), dtype=torch.long)))
        value >>= 32
        if not value:
            return folded


def sequence_uniforms(seed: int, stream: int, sequences: torch.Tensor, position: int) -> torch.Tensor:
    """One uniform in [0, 1) (float64, 53 random bits) per entry of `sequences` (int64 sequence
    indices) at response `position`: a counter-based draw that depends only on (seed, stream,
    sequence index, position), never on which other sequences share the batch or the device."""
    key = _fold((_fold(seed) << 32) | _fold(stream))
    h = _mix32((sequences.long() & _MASK32) ^ key)
    h = _mix32(h ^ _fold(position))
    high = _mix32(h ^ 0x9E3779B9) >> 5  # 27 bits
    low = _mix32(h ^ 0x7F4A7C15) >> 6  # 26 bits
    return (high * 67108864 + low).double() / 9007199254740992.0  # (high * 2**26 + low) / 2**53


def sample_tokens(logprobs: torch.Tensor, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from exp(logprobs), restricted to the top-p nucleus when top_p < 1, by
    inverse transform of the row's uniform in [0, 1) (float64 cumulative sums).

    The nucleus is the smallest prefix (by descending probability) whose mass reaches top_p:
    a token is kept when the mass strictly before it is below top_p, so the top token always is.
    """
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    # The first token whose cumulative mass exceeds the target: a token of zero mass never is.
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _with_parameters_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its floating-point parameters cast to `dtype` in place; buffers keep their
    dtype, as `from_pretrained(dtype=...)` leaves them: the rotary embedding's float32 inverse
    frequencies (`module.to(bfloat16)` would round them, and with them every position's angle,
    so the copy would sample unlike the same weights loaded in bf16, or vLLM)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model


class HFEngine(EngineBase):
    name = "hf"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        seed: int = 0,
        static_cache: bool | None = None,
        compile: bool | None = None,
        dtype: Any = None,
        max_batch_sequences: int | None = None,
    ) -> None:
        """`model` is the trainer's policy module itself, so no weight sync is needed; unless
        `dtype` (the compute dtype) differs from the model's parameters (fp32 masters, bf16
        compute): then the engine samples from its own copy in `dtype`, which `sync_weights`
        refreshes from the trainer's weights (cast on the way in). `max_batch_sequences`
        (rollout.max_batch_sequences): at most that many sequences decode together (the KV
        cache's size); None: a call's sequences all at once."""
        from tre_cli.models import resolve_dtype
        from tre_cli.models.precision import float_dtype_of

        self.owns_copy = False
        if dtype is not None:
            target = resolve_dtype(dtype, device)
            if float_dtype_of(model) != target:
                model = _with_parameters_in(copy.deepcopy(model), target).requires_grad_(False).eval()
                self.owns_copy = True
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.static_cache = on_cuda if static_cache is None else bool(static_cache)
        self.compile = (on_cuda and self.static_cache) if compile is None else bool(compile)
        if self.compile and not self.static_cache:
            raise ValueError("hf engine: compile=True needs static_cache=True (shapes must not change)")
        self.eos_token_ids = eos_token_ids_of(tokenizer, getattr(model, "generation_config", None) or model.config)
        if tokenizer.pad_token_id is None:
            raise ValueError("hf engine: the tokenizer has no pad token")
        self.pad_token_id = int(tokenizer.pad_token_id)
        # Per-sequence sampling: sample k of a call draws its noise from (seed, stream,
        # first_sequence + k, position). A call without a stream takes the next of the engine's
        # own counter, so successive calls differ and a re-created engine with the same seed
        # repeats them.
        self.seed = int(seed)
        self.calls = 0
        if max_batch_sequences is not None and int(max_batch_sequences) < 1:
            raise ValueError(f"rollout.max_batch_sequences must be >= 1, got {max_batch_sequences}")
        self.max_batch_sequences = None if max_batch_sequences is None else int(max_batch_sequences)
        self._compiled_step = None
        self._static_caches: dict[tuple[int, int], object] = {}

    # -- interface ---------------------------------------------------------------------------

    def sync_weights(self, weights: Weights = None) -> None:
        """Nothing to do when `weights` is the module the engine samples from (the trainer's
        policy) or that module's own state dict; another module's weights, or a state dict, are
        loaded into the engine's module (cast to its dtype: its own copy under fp32 masters).
        (name, tensor) pairs that are not a mapping (a sharded policy's stream) are copied in
        one at a time, as they come."""
        if weights is None or weights is self.model:
            return
        state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        own = self.model.state_dict()
        if not hasattr(state_dict, "items"):
            with torch.no_grad():
                for name, tensor in state_dict:
                    if name in own:  # as load_state_dict(strict=False) below
                        own[name].copy_(tensor)
            return
        state = dict(state_dict.items())
        if all(name in own and tensor.data_ptr() == own[name].data_ptr() for name, tensor in state.items()):
            return
        self.model.load_state_dict(state, strict=False)

    @torch.no_grad()
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
        """n samples of each prompt. Sample k (prompt k // n) is sequence `first_sequence + k`
        of sampling stream `stream` (the trainer: its step): its tokens depend on the engine's
        seed, the stream, that index and the weights only, so a batch split across calls or
        workers samples the same tokens. `stream` None: the engine's own call counter."""
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p)
        if stream is None:
            stream = self.calls
            self.calls += 1
        if first_sequence < 0:
            raise ValueError(f"first_sequence must be >= 0, got {first_sequence}")
        expanded = [list(prompts[k // n]) for k in range(len(prompts) * n)]
        # Every batch is padded to the call's widest prompt, so a sequence's inputs (and, with its
        # own noise, its sample) do not depend on which batch it decodes in.
        prompt_width = max(len(p) for p in expanded)
        size = self.max_batch_sequences or len(expanded)
        was_training = self.model.training
        self.model.eval()
        responses: list[list[int]] = []
        logprobs: list[list[float]] = []
        try:
            for start in range(0, len(expanded), size):
                chunk = expanded[start:start + size]
                real = len(chunk)
                if self.static_cache and len(expanded) > size:
                    # A short last batch is filled up with copies (their samples are dropped), so
                    # every batch reuses one static cache and one compiled step.
                    chunk = chunk + [chunk[-1]] * (size - real)
                sequences = torch.arange(first_sequence + start, first_sequence + start + len(chunk),
                                         device=self.device)
                report = ((lambda done, before=start, real=real: progress(before + min(done, real)))
                          if progress else None)
                got, got_logprobs = self._sample(
                    chunk, max_new_tokens, temperature, top_p,
                    lambda position, rows=sequences: sequence_uniforms(self.seed, stream, rows, position),
                    report, prompt_width)
                responses.extend(got[:real])
                logprobs.extend(got_logprobs[:real])
        finally:
            self.model.train(was_training)
        return assemble_rollout(
            prompts, n, responses, logprobs, self.eos_token_ids, self.pad_token_id, self.tokenizer, temperature
        )

    # -- decoding ----------------------------------------------------------------------------

    def _sample(self, expanded, max_new_tokens, temperature, top_p, uniforms, progress=None, width=None):
        """Samples of the prompts `expanded` (one a sequence), left-padded to `width` (None: the
        widest)."""
        prompt_ids, prompt_mask = left_pad(expanded, self.pad_token_id, width)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        batch, prompt_width = prompt_ids.shape
        total_width = prompt_width + max_new_tokens
        cache_width = total_width
        if self.static_cache:
            cache_width = -(-total_width // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
            cache = self._static_cache(batch, cache_width)
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        # One attention-mask buffer for the whole call: a static cache attends over its full
        # width, and unwritten columns stay 0.
        attention_mask = torch.zeros((batch, cache_width), dtype=torch.long, device=self.device)
        attention_mask[:, :prompt_width] = prompt_mask
        positions = position_ids_from_mask(prompt_mask)
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=attention_mask if self.static_cache else attention_mask[:, :prompt_width],
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        next_position = positions[:, -1:] + 1
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        tokens_per_step, logprobs_per_step, alive_per_step = [], [], []
        step_fn = self._step_function()
        for step in range(max_new_tokens):
            logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
            token = sample_tokens(logprobs, top_p, uniforms(step))
            token_logprob = logprobs.gather(-1, token[:, None]).squeeze(-1)
            alive_per_step.append(~done)
            token = torch.where(done, torch.full_like(token, self.pad_token_id), token)
            tokens_per_step.append(token)
            logprobs_per_step.append(token_logprob)
            done = done | torch.isin(token, eos)
            if progress is not None:
                progress(int(done.sum()))
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            column = prompt_width + step
            attention_mask[:, column] = 1
            width = cache_width if self.static_cache else column + 1
            logits = step_fn(token[:, None], attention_mask[:, :width], next_position, cache)
            next_position = next_position + 1
        if progress is not None:
            progress(batch)  # the rest were cut at max_new_tokens
        tokens = torch.stack(tokens_per_step, 1).cpu()
        token_logprobs = torch.stack(logprobs_per_step, 1).float().cpu()
        alive = torch.stack(alive_per_step, 1).cpu()
        lengths = alive.sum(-1).tolist()
        responses = [tokens[row, :length].tolist() for row, length in enumerate(lengths)]
        logprob_lists = [token_logprobs[row, :length].tolist() for row, length in enumerate(lengths)]
        return responses, logprob_lists

    def _static_cache(self, batch: int, width: int):
        """One cache per (batch, width), reset and reused: a compiled step guards on the cache
        object, so a fresh cache every call would recompile every call."""
        from transformers import StaticCache

        key = (batch, width)
        if key in self._static_caches:
            cache = self._static_caches[key]
            cache.reset()
        else:
            cache = self._static_caches[key] = StaticCache(config=self.model.config, max_cache_len=width)
        return cache

    def _decode_step(self, token, attention_mask, position_ids, cache):
        out = self.model(
            input_ids=token,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _step_function(self):
        if not self.compile:
            return self._decode_step
        if self._compiled_step is None:
            # CUDA graphs replay the whole one-token step: the cache, mask and positions keep
            # their shapes for a given (batch, cache width), so each bucket compiles once.
            self._compiled_step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=False)
        compiled = self._compiled_step

        def step(token, attention_mask, position_ids, cache):
            # Graph outputs are overwritten by the next replay: keep a copy.
            return compiled(token, attention_mask, position_ids, cache).clone()

        return step
