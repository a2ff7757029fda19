"""The run config's schema: one typed, frozen dataclass per section, each checking its own
values (an error names the key), and the presets (`smoke`, `paper`).

Method parameters come from the registry (tre_cli.losses.registry): `MethodConfig` is the
method's name and every one of its parameters, checked there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal
from collections.abc import Mapping

from tre_cli.losses.registry import DEFAULT_METHOD, METHODS, ParamError


def _key_error(key: str, message: str) -> ValueError:
    return ValueError(f"config key '{key}' {message}")


def _require(ok: bool, key: str, message: str, value: object) -> None:
    if not ok:
        raise _key_error(key, f"{message}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    # A hub id, a local directory, or "testbed" (the small model tre builds locally).
    name: str = "testbed"
    # "auto": bf16 on cuda, fp32 on cpu (tre_cli.models.resolve_dtype).
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # "auto": on for cuda, off on cpu (see resolve_gradient_checkpointing).
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # The critic's base model; None = the same as `name` (as in the paper).
    critic_name: str | None = None
    # Std of the value head's initial weights; None = the model's initializer_range (0.02 for
    # Qwen2.5), as the released code. A small value (1e-3) starts the critic near V = 0.
    value_head_init_std: float | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model.name", "must not be empty", self.name)
        if self.value_head_init_std is not None:
            _require(self.value_head_init_std > 0, "model.value_head_init_std", "must be > 0 (or null)",
                     self.value_head_init_std)


@dataclass(frozen=True)
class TaskConfig:
    name: str = "countdown"
    # Free-form: checked by the task module (tre_cli.tasks.get_task(name, **options)).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "task.name", "must not be empty", self.name)


@dataclass(frozen=True)
class MethodConfig:
    """A method (see `tre methods`) and every one of its parameters, checked against the
    registry, which is the one description of each method. Build it with `MethodConfig.of`."""

    name: str = DEFAULT_METHOD
    params: dict[str, Any] = field(default_factory=lambda: dict(METHODS[DEFAULT_METHOD].defaults))

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise _key_error(
                "method.name", f"names an unknown method {self.name!r}; choose one of: {', '.join(METHODS)}"
            )
        try:
            resolved = METHODS[self.name].resolve_params(self.params)
        except ParamError as error:
            raise _key_error(f"method.{error.param}", error.message) from None
        if resolved != dict(self.params):  # a bug of the caller, not user input: use MethodConfig.of
            raise ValueError(
                f"MethodConfig({self.name!r}) needs every parameter of the method, got {dict(self.params)}"
            )

    @staticmethod
    def of(name: str, params: Mapping[str, Any] | None = None) -> MethodConfig:
        """The method with `params`; the ones not given (or None) take the registry's defaults."""
        if name not in METHODS:
            raise _key_error("method.name", f"names an unknown method {name!r}; choose one of: {', '.join(METHODS)}")
        given = {key: value for key, value in (params or {}).items() if value is not None}
        try:
            return MethodConfig(name, METHODS[name].resolve_params(given))
        except ParamError as error:
            raise _key_error(f"method.{error.param}", error.message) from None


@dataclass(frozen=True)
class PPOConfig:
    """Defaults are the paper's Table 2 and its released scripts."""

    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    # The critic's learning rate ramps up linearly over this fraction of the steps.
    critic_warmup_ratio: float = 0.05
    # "released": i / w (the first step at lr 0, verl); "shifted": (i + 1) / (w + 1) (schedules.py).
    critic_warmup_ramp: Literal["released", "shifted"] = "released"
    # AdamW weight decay of actor and critic (the released code: verl's 0.01).
    weight_decay: float = 0.01
    # Factor of the critic's squared error (the released code: 1.0; 0.5 is TRL's convention).
    critic_loss_coef: float = 1.0
    prompts_per_step: int = 512
    rollouts_per_prompt: int = 8
    # One optimizer update per mini-batch of prompts (with all their rollouts): 512 / 64 = 8 per step.
    mini_batch_prompts: int = 64
    # Gradient accumulation budget: sequences are packed into micro-batches of at most this many
    # (padded) tokens; a longer sequence goes alone. A token budget rather than a sequence count
    # because response lengths vary by 100x within a step (MATH: up to 8,192).
    micro_batch_tokens: int = 16384
    # How rows are split into micro-batches when they do not fit in one: "rows" in their order;
    # "length" longest first, so a short response is not padded to a long one's width (less
    # compute, the same loss up to float rounding: a speed knob). "rows" keeps earlier runs
    # bitwise; the small preset uses "length".
    micro_batch_order: Literal["rows", "length"] = "rows"
    # Sequences per Forking-Tokens / KL-Cov selection group (method.scope=group), the
    # released scripts' per-GPU micro-batch; independent of micro_batch_tokens (a memory knob).
    # Task overlays set the released 1.5B values: MATH 8, Countdown 16, HH 16.
    selection_group_size: int = 16
    epochs: int = 1
    # the advantage estimator: "gae" (the paper: a critic and GAE), or critic-free from
    # each prompt's group of rollouts: "grpo", "dr-grpo", "rloo" (losses/estimators.py; no critic
    # is built, stepped or checkpointed, and rollouts_per_prompt must be >= 2).
    estimator: Literal["gae", "grpo", "dr-grpo", "rloo"] = "gae"
    clip: float = 0.2
    # clip-higher (DAPO): the ratio is clipped to [1 - clip_low, 1 + clip_high]; null: ppo.clip.
    clip_low: float | None = None
    clip_high: float | None = None
    # drop the prompts whose rollouts all scored the same from the updates (DAPO's
    # dynamic sampling, without refilling the batch); their count is logged (rollout/uniform_groups).
    skip_uniform_groups: bool = False
    # Dual-clip bound c for negative advantages; None disables it.
    dual_clip_c: float | None = 3.0
    # Critic value clipping range; None disables it.
    value_clip: float | None = 0.5
    gamma: float = 1.0
    lam: float = 1.0
    # Whiten advantages over the step's response tokens, as the released code (verl's GAE) does.
    # GAE only: a critic-free estimator's advantages are used as they are (as verl).
    whiten_advantages: bool = True
    # > 0 adds kl_coef * KL(pi || pi_ref) to the actor loss against a frozen copy of the
    # starting policy (verl's actor.use_kl_loss); 0 (the paper) loads no reference model.
    kl_coef: float = 0.0
    # The per-token KL estimator (tre_cli/losses/kl.py); verl's default is low_var_kl (Schulman's k3).
    kl_loss_type: Literal["low_var_kl", "k1", "abs", "mse"] = "low_var_kl"
    # "seq-mean-token-sum-norm" (Dr. GRPO) divides the token sum by rollout.max_new_tokens;
    # it is ppo.estimator=dr-grpo's own when no layer above the presets sets this key.
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = \
        "token-mean"
    max_grad_norm: float = 1.0
    # The paper: MATH 300, Countdown 400, HH 300; task overlays set theirs.
    steps: int = 400
    max_prompt_length: int = 1024

    def __post_init__(self) -> None:
        for name in ("actor_lr", "critic_lr", "clip", "max_grad_norm", "critic_loss_coef"):
            _require(getattr(self, name) > 0, f"ppo.{name}", "must be > 0", getattr(self, name))
        _require(self.weight_decay >= 0, "ppo.weight_decay", "must be >= 0", self.weight_decay)
        _require(
            0 <= self.critic_warmup_ratio < 1, "ppo.critic_warmup_ratio", "must be in [0, 1)", self.critic_warmup_ratio
        )
        for name in (
            "prompts_per_step",
            "rollouts_per_prompt",
            "mini_batch_prompts",
            "micro_batch_tokens",
            "epochs",
            "steps",
            "max_prompt_length",
            "selection_group_size",
        ):
            _require(getattr(self, name) >= 1, f"ppo.{name}", "must be >= 1", getattr(self, name))
        if self.prompts_per_step % self.mini_batch_prompts:
            raise _key_error(
                "ppo.mini_batch_prompts",
                f"({self.mini_batch_prompts}) must divide ppo.prompts_per_step ({self.prompts_per_step})",
            )
        if self.dual_clip_c is not None:
            _require(self.dual_clip_c > 1, "ppo.dual_clip_c", "must be > 1 (or null to disable)", self.dual_clip_c)
        if self.value_clip is not None:
            _require(self.value_clip > 0, "ppo.value_clip", "must be > 0 (or null to disable)", self.value_clip)
        for name in ("gamma", "lam"):
            _require(0 <= getattr(self, name) <= 1, f"ppo.{name}", "must be in [0, 1]", getattr(self, name))
        _require(self.kl_coef >= 0, "ppo.kl_coef", "must be >= 0", self.kl_coef)
        if self.clip_low is not None:
            _require(0 < self.clip_low < 1, "ppo.clip_low", "must be in (0, 1) (or null: ppo.clip)", self.clip_low)
        if self.clip_high is not None:
            _require(self.clip_high > 0, "ppo.clip_high", "must be > 0 (or null: ppo.clip)", self.clip_high)
        if self.estimator != "gae":
            _require(self.rollouts_per_prompt >= 2, "ppo.rollouts_per_prompt",
                     f"must be >= 2 with ppo.estimator={self.estimator} (the baseline is the prompt's group)",
                     self.rollouts_per_prompt)


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    # None: the task's default (its overlay normally sets it: MATH 8192, Countdown 512, HH 1024).
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    # vLLM only: the fraction of GPU memory vLLM's start-up admission check allows. The engine
    # always sets its KV cache's size (kv_cache_memory_bytes, else 20% of the GPU), so this does
    # not size the cache; it only lets the engine start beside the trainer's memory.
    gpu_memory_utilization: float = 0.5
    # vLLM only: an explicit KV-cache size in bytes (None: 20% of the GPU's memory; 512 MiB on CPU).
    kv_cache_memory_bytes: int | None = None
    # hf only: at most this many sequences decode together (its KV cache holds them at full width);
    # None: all of a call's at once. Batching never changes a sample (per-sequence noise).
    max_batch_sequences: int | None = None
    # Strings that end a response (verl's and vLLM's `stop`): it keeps the text up to and
    # including the first one, counts as finished, and the reward reads that text. None in the
    # paper's runs (they stop at EOS only); sweeps/smollm2.yaml stops Countdown at "</answer>".
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(all(isinstance(s, str) and s for s in self.stop), "rollout.stop",
                 "must be a list of non-empty strings", list(self.stop))
        if self.max_new_tokens is not None:
            _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", self.max_new_tokens)
        _require(self.temperature > 0, "rollout.temperature", "must be > 0", self.temperature)
        _require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]", self.top_p)
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "rollout.gpu_memory_utilization",
            "must be in (0, 1]",
            self.gpu_memory_utilization,
        )
        if self.max_batch_sequences is not None:
            _require(self.max_batch_sequences >= 1, "rollout.max_batch_sequences", "must be >= 1",
                     self.max_batch_sequences)
        if self.kv_cache_memory_bytes is not None:
            _require(
                self.kv_cache_memory_bytes >= 1,
                "rollout.kv_cache_memory_bytes",
                "must be >= 1",
                self.kv_cache_memory_bytes,
            )


@dataclass(frozen=True)
class EvalConfig:
    """The paper's protocol: 8 samples per test prompt at temperature 1.0, top-p 0.7."""

    # Evaluate every this many steps; 0 = only at the end (the end is always evaluated).
    every: int = 50
    # Also evaluate the starting model, logged as step 0 of eval.jsonl (verl's val_before_train).
    # It is the baseline a run's curve starts from; final and best eval scores leave it out.
    before_train: bool = False
    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.7
    # Number of test prompts; None = the whole test split.
    limit: int | None = None
    # None: the task's metric (pass@1 for MATH and Countdown, mean reward for HH).
    metric: str | None = None

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0", self.every)
        _require(self.n_samples >= 1, "eval.n_samples", "must be >= 1", self.n_samples)
        _require(self.temperature > 0, "eval.temperature", "must be > 0", self.temperature)
        _require(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]", self.top_p)
        if self.limit is not None:
            _require(self.limit >= 1, "eval.limit", "must be >= 1 (or null for all)", self.limit)
        if self.metric is not None:
            _require(bool(self.metric.strip()), "eval.metric", "must not be empty", self.metric)


@dataclass(frozen=True)
class MetricsConfig:
    """Diagnostics of where the policy puts its mass (they change no loss)."""

    # actor/tail_mass: the policy's mass outside its tail_k most probable tokens (token mean over
    # the response), from the update's forward pass.
    tail_k: int = 20
    # rollout/tail_draws(_per_response): sampled tokens whose probability under the sampling
    # policy was below tail_p.
    tail_p: float = 1e-3

    def __post_init__(self) -> None:
        _require(not isinstance(self.tail_k, bool) and self.tail_k >= 1, "metrics.tail_k", "must be >= 1",
                 self.tail_k)
        _require(0 < self.tail_p < 1, "metrics.tail_p", "must be in (0, 1)", self.tail_p)


@dataclass(frozen=True)
class WandbConfig:
    project: str = "tre"
    entity: str | None = None
    # offline: logged under the run directory, sync later with `wandb sync`; disabled: wandb is never imported.
    mode: Literal["offline", "online", "disabled"] = "offline"
    # Runs of one sweep share a group (tre sweep sets it), so W&B shows them together.
    group: str | None = None


@dataclass(frozen=True)
class RunSection:
    seed: int = 0
    # The run directory; None = runs/<task>-<method>-<timestamp> (tracking.default_run_dir).
    out: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Checkpoint every this many steps; 0 = only at the end.
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # A run directory to continue from its latest checkpoint; None = a fresh run.
    resume: str | None = None
    # Directory of the append-only results.jsonl; None = the run directory's parent.
    results_store: str | None = None
    # Data-parallel training processes of this run (Ray Train workers, policy and
    # critic sharded with FSDP2); 1 = this process alone, as before.
    workers: int = 1
    # With run.workers > 1, how many times a failed worker group (a crash, a killed or
    # preempted worker) is started again, each time resuming from the last checkpoint (Ray
    # Train's max_failures); 0 = the failure ends the run (`tre run --resume` continues it).
    worker_retries: int = 0
    # Progress within a step (generation, old log-probs, update) on stderr: "auto" when
    # stderr is a terminal, "on" also as plain lines in a log file, "off" never. Display only.
    progress: Literal["auto", "on", "off"] = "auto"
    # The rollout engines' and transformers' own logs (quiet by default); --verbose.
    verbose: bool = False

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "run.seed", "must be >= 0", self.seed)
        _require(self.workers >= 1, "run.workers", "must be >= 1", self.workers)
        _require(self.worker_retries >= 0, "run.worker_retries", "must be >= 0", self.worker_retries)
        _require(self.save_every >= 0, "run.save_every", "must be >= 0", self.save_every)
        _require(self.keep_last >= 1, "run.keep_last", "must be >= 1", self.keep_last)
        _require(self.log_every >= 1, "run.log_every", "must be >= 1", self.log_every)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunSection = field(default_factory=RunSection)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        problem = METHODS[self.method.name].loss_agg_problem(self.ppo.loss_agg)
        if problem:
            raise _key_error("ppo.loss_agg", problem)


SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))

# Presets sit above the task overlay and below --config/--set. They never name a task or a
# method, and leave steps/max_new_tokens to the task except where a preset is about size.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    # Runs on 2 CPU cores in minutes with the testbed model: 16 prompts x 4 rollouts, 4 updates per step.
    "smoke": {
        "model": {"name": "testbed"},
        "ppo": {
            "prompts_per_step": 16,
            "rollouts_per_prompt": 4,
            "mini_batch_prompts": 4,
            "micro_batch_tokens": 4096,
            "steps": 30,
            "max_prompt_length": 256,
            # The paper's 1e-6 / 1e-5 barely move a 1M-parameter model in 30 steps; 1e-4 lets the
            # testbed unlearn its answer slip within the run, 3e-4 collapses it.
            "actor_lr": 1e-4,
            "critic_lr": 1e-3,
        },
        "rollout": {"engine": "hf", "max_new_tokens": 48},
        "eval": {"every": 10, "limit": 128, "n_samples": 2, "before_train": True},
        "run": {"save_every": 10, "keep_last": 1},
    },
    # A real model of up to a few hundred million parameters on a CPU (or a laptop GPU),
    # chosen from measurements of SmolLM2-135M-Instruct on 2 cores (bench/RESULTS.md, "SmolLM2-135M
    # on CPU"): each sequence of a step costs about 10-25 CPU-seconds there (prompt ~120 tokens +
    # up to T; policy and critic forward and backward), so a step of about a minute holds 8.
    # Pass the model with --model. Countdown: SmolLM2 never writes the answer format unprompted;
    # sweeps/smollm2.yaml opens its answer (response_prefix), stops at </answer> (rollout.stop)
    # and gives a well-formed answer 0.1 (format_score).
    "small": {
        "ppo": {
            "prompts_per_step": 4,
            "rollouts_per_prompt": 2,
            "mini_batch_prompts": 2,
            # At most 3 sequences of ~130 prompt + up to 64 response tokens, split by length (a
            # short response is not padded to the longest's width; bench/RESULTS.md).
            "micro_batch_tokens": 640,
            "micro_batch_order": "length",
            "steps": 30,
            "max_prompt_length": 256,
            # 20-30 steps of 2 updates: the paper's 1e-6 would barely move the model.
            "actor_lr": 5e-6,
            "critic_lr": 5e-5,
        },
        "rollout": {"engine": "vllm", "max_new_tokens": 64, "kv_cache_memory_bytes": 1_000_000_000},
        "eval": {"every": 10, "limit": 32, "n_samples": 2, "before_train": True},
        "run": {"save_every": 10, "keep_last": 1},
    },
    # The paper's setup (Table 2 and Section 4), written out so it does not drift with the defaults.
    # Steps and max_new_tokens come from the task overlay (MATH 300/8192, Countdown 400/512, HH 300/1024).
    "paper": {
        "model": {"name": "Qwen/Qwen2.5-1.5B-Instruct"},
        "ppo": {
            "actor_lr": 1e-6,
            "critic_lr": 1e-5,
            "critic_warmup_ratio": 0.05,
            "prompts_per_step": 512,
            "rollouts_per_prompt": 8,
            "mini_batch_prompts": 64,
            "epochs": 1,
            "clip": 0.2,
            "dual_clip_c": 3.0,
            "gamma": 1.0,
            "lam": 1.0,
            "kl_coef": 0.0,
            "loss_agg": "token-mean",
            "max_prompt_length": 1024,
            # The released code's optimizer and critic details (README: "Released configuration").
            "weight_decay": 0.01,
            "critic_loss_coef": 1.0,
            "critic_warmup_ramp": "released",
        },
        "rollout": {"engine": "vllm", "temperature": 1.0, "top_p": 1.0},
        "eval": {"n_samples": 8, "temperature": 1.0, "top_p": 0.7, "limit": None},
    },
}
