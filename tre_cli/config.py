"""The run configuration: typed, frozen, resolved once, written to the run directory first.

Precedence, lowest to highest (each layer only names the keys it changes):

    dataclass defaults
    < the method's defaults (``METHODS[name].defaults``)
    < the task overlay (``tasks/<task>.yaml``: steps, max_new_tokens, eval metric...)
    < the preset (``smoke`` or ``paper``)
    < ``--config FILE`` (YAML, the same nested layout as ``config.yaml`` in a run directory)
    < the ``--task`` / ``--method`` / ``--model`` flags
    < ``--set a.b=c`` (in the order given; the value is read as a YAML scalar)

Task options live under ``task.options`` and are set as ``--set task.options.NAME=VALUE``; they are
free-form here and validated by the task module when the task is built. ``task.NAME`` is an
unknown key (the error suggests ``task.options.NAME``), so an option can never shadow ``task.name``.

Method parameters are flat under ``method`` (``method.alpha``, ``method.k``...). A parameter that
the chosen method does not have is an error naming it, so ``--set method.k=5`` with ``tre-p`` never
silently does nothing.

Every error is one line that names the key (and the file or flag it came from).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from tre_cli.losses.registry import METHODS

# Every method parameter any method may have; which ones a method has is METHODS[name].defaults.
METHOD_PARAMS = ("alpha", "k", "p", "released_code_compat", "top_ratio", "scope", "ratio", "beta", "count_rounding")


def _key_error(key: str, message: str) -> ValueError:
    return ValueError(f"config key '{key}' {message}")


def _require(ok: bool, key: str, message: str, value: object) -> None:
    if not ok:
        raise _key_error(key, f"{message}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    # A hub id, a local directory, or "testbed" (the small model tre builds locally).
    name: str = "testbed"
    # "auto": bf16 on cuda, fp32 on cpu (see resolve_dtype).
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # "auto": on for cuda, off on cpu (see resolve_gradient_checkpointing).
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    # The critic's base model; None = the same as `name` (as in the paper).
    critic_name: Optional[str] = None
    # issue 11: std of the value head's initial weights; None = the model's initializer_range
    # (0.02 for Qwen2.5), as the released code; tre used 1e-3 before (a critic starting near V = 0).
    value_head_init_std: Optional[float] = None

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model.name", "must not be empty", self.name)
        if self.value_head_init_std is not None:
            _require(self.value_head_init_std > 0, "model.value_head_init_std", "must be > 0 (or null)", self.value_head_init_std)


@dataclass(frozen=True)
class TaskConfig:
    name: str = "countdown"
    # Free-form: checked by the task module (tre_cli.tasks.get_task(name, **options)).
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "task.name", "must not be empty", self.name)


@dataclass(frozen=True)
class MethodConfig:
    """The method and its parameters; a parameter the method does not have stays None."""

    name: str = "tre-p"
    alpha: Optional[float] = None  # regularizer coefficient
    k: Optional[int] = None  # TRE-K region size
    p: Optional[float] = None  # TRE-P nucleus mass
    released_code_compat: Optional[bool] = None  # TRE-P: reproduce the released code's top-256 cap and bf16 cumsum
    top_ratio: Optional[float] = None  # Forking-Tokens: fraction of highest-entropy tokens kept
    # issue 11: Forking-Tokens / KL-Cov select within groups of ppo.selection_group_size sequences
    # ("group", the released code's per-GPU micro-batch) or over the whole mini-batch ("global").
    scope: Optional[Literal["group", "global"]] = None
    ratio: Optional[float] = None  # KL-Cov: fraction of tokens penalised
    beta: Optional[float] = None  # KL-Cov: penalty coefficient
    # issue 11: Forking-Tokens' count of kept tokens: "ceil" (the released code) or "floor".
    count_rounding: Optional[Literal["ceil", "floor"]] = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise _key_error("method.name", f"names an unknown method {self.name!r}; choose one of: {', '.join(METHODS)}")
        defaults = METHODS[self.name].defaults
        for param in METHOD_PARAMS:
            value = getattr(self, param)
            if param not in defaults:
                if value is not None:
                    own = ", ".join(defaults) or "none"
                    raise _key_error(f"method.{param}", f"is not a parameter of method '{self.name}' (its parameters: {own})")
            elif value is None:
                # Frozen, so defaults are filled here rather than by the caller.
                object.__setattr__(self, param, defaults[param])
        if self.alpha is not None:
            _require(self.alpha >= 0, "method.alpha", "must be >= 0", self.alpha)
        if self.k is not None:
            _require(self.k >= 1, "method.k", "must be an integer >= 1", self.k)
        for name in ("p", "top_ratio", "ratio"):
            value = getattr(self, name)
            if value is not None:
                _require(0 < value <= 1, f"method.{name}", "must be in (0, 1]", value)
        if self.beta is not None:
            _require(self.beta >= 0, "method.beta", "must be >= 0", self.beta)

    @property
    def params(self) -> Dict[str, Any]:
        """The chosen method's parameters (name -> value), in the registry's order."""
        return {name: getattr(self, name) for name in METHODS[self.name].defaults}


@dataclass(frozen=True)
class PPOConfig:
    """Defaults are the paper's Table 2 and its released scripts."""

    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    # The critic's learning rate ramps up linearly over this fraction of the steps.
    critic_warmup_ratio: float = 0.05
    # issue 11: "released" i / w (the first step at lr 0, verl) or "shifted" (i + 1) / (w + 1) (tre before).
    critic_warmup_ramp: Literal["released", "shifted"] = "released"
    # issue 11: AdamW weight decay of actor and critic (the released code: verl's 0.01; tre used 0).
    weight_decay: float = 0.01
    # issue 11: factor of the critic's squared error (the released code: 1.0; 0.5 is TRL's, tre before).
    critic_loss_coef: float = 1.0
    prompts_per_step: int = 512
    rollouts_per_prompt: int = 8
    # One optimizer update per mini-batch of prompts (with all their rollouts): 512 / 64 = 8 per step.
    mini_batch_prompts: int = 64
    # Gradient accumulation budget: sequences are packed into micro-batches of at most this many
    # (padded) tokens; a longer sequence goes alone. A token budget rather than a sequence count
    # because response lengths vary by 100x within a step (MATH: up to 8,192).
    micro_batch_tokens: int = 16384
    # issue 11: sequences per Forking-Tokens / KL-Cov selection group (method.scope=group), the
    # released scripts' per-GPU micro-batch; independent of micro_batch_tokens (a memory knob).
    # Task overlays set the released 1.5B values: MATH 8, Countdown 16, HH 16.
    selection_group_size: int = 16
    epochs: int = 1
    clip: float = 0.2
    # Dual-clip bound c for negative advantages; None disables it.
    dual_clip_c: Optional[float] = 3.0
    # Critic value clipping range; None disables it.
    value_clip: Optional[float] = 0.5
    gamma: float = 1.0
    lam: float = 1.0
    # Whiten advantages over the step's response tokens, as the released code (verl's GAE) does.
    whiten_advantages: bool = True
    # issue 11: > 0 adds kl_coef * KL(pi || pi_ref) to the actor loss against a frozen copy of the
    # starting policy (verl's actor.use_kl_loss); 0 (the paper) loads no reference model.
    kl_coef: float = 0.0
    # The per-token KL estimator (tre_cli/losses/kl.py); verl's default is low_var_kl (Schulman's k3).
    kl_loss_type: Literal["low_var_kl", "k1", "abs", "mse"] = "low_var_kl"
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    max_grad_norm: float = 1.0
    # The paper: MATH 300, Countdown 400, HH 300; task overlays set theirs.
    steps: int = 400
    max_prompt_length: int = 1024

    def __post_init__(self) -> None:
        for name in ("actor_lr", "critic_lr", "clip", "max_grad_norm", "critic_loss_coef"):
            _require(getattr(self, name) > 0, f"ppo.{name}", "must be > 0", getattr(self, name))
        _require(self.weight_decay >= 0, "ppo.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.critic_warmup_ratio < 1, "ppo.critic_warmup_ratio", "must be in [0, 1)", self.critic_warmup_ratio)
        for name in ("prompts_per_step", "rollouts_per_prompt", "mini_batch_prompts", "micro_batch_tokens", "epochs", "steps",
                     "max_prompt_length", "selection_group_size"):
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


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    # None: the task's default (its overlay normally sets it: MATH 8192, Countdown 512, HH 1024).
    max_new_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    # vLLM only: the fraction of GPU memory vLLM may take (it shares the GPU with training).
    gpu_memory_utilization: float = 0.5
    # vLLM only: an explicit KV-cache size in bytes; overrides gpu_memory_utilization for the cache.
    kv_cache_memory_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", self.max_new_tokens)
        _require(self.temperature > 0, "rollout.temperature", "must be > 0", self.temperature)
        _require(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]", self.top_p)
        _require(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]", self.gpu_memory_utilization)
        if self.kv_cache_memory_bytes is not None:
            _require(self.kv_cache_memory_bytes >= 1, "rollout.kv_cache_memory_bytes", "must be >= 1", self.kv_cache_memory_bytes)


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
    limit: Optional[int] = None
    # None: the task's metric (pass@1 for MATH and Countdown, mean reward for HH).
    metric: Optional[str] = None

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
class WandbConfig:
    project: str = "tre"
    entity: Optional[str] = None
    # offline: logged under the run directory, sync later with `wandb sync`; disabled: wandb is never imported.
    mode: Literal["offline", "online", "disabled"] = "offline"
    # Runs of one sweep share a group (tre sweep sets it), so W&B shows them together.
    group: Optional[str] = None


@dataclass(frozen=True)
class RunSection:
    seed: int = 0
    # The run directory; None = runs/<task>-<method>-<timestamp> (tracking.default_run_dir).
    out: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Checkpoint every this many steps; 0 = only at the end.
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # A run directory to continue from its latest checkpoint; None = a fresh run.
    resume: Optional[str] = None
    # Directory of the append-only results.jsonl; None = the run directory's parent.
    results_store: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "run.seed", "must be >= 0", self.seed)
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


SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))

# Presets sit above the task overlay and below --config/--set. They never name a task or a
# method, and leave steps/max_new_tokens to the task except where a preset is about size.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    # Runs on 2 CPU cores in minutes with the testbed model: 8 prompts x 4 rollouts, 2 updates per step.
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
            # issue 11: the released code's optimizer and critic details (README: "Released configuration").
            "weight_decay": 0.01,
            "critic_loss_coef": 1.0,
            "critic_warmup_ramp": "released",
        },
        "rollout": {"engine": "vllm", "temperature": 1.0, "top_p": 1.0},
        "eval": {"n_samples": 8, "temperature": 1.0, "top_p": 0.7, "limit": None},
    },
}


# --------------------------------------------------------------------------- schema and types


def _hints(cls: type) -> Dict[str, Any]:
    return get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _all_keys(cls: type = RunConfig, prefix: str = "") -> List[str]:
    keys: List[str] = []
    for name, tp in _hints(cls).items():
        key = prefix + name
        keys.append(key)
        if _is_section(tp):
            keys.extend(_all_keys(tp, key + "."))
    return keys


def _unknown_key(key: str) -> ValueError:
    if key.startswith("task.") and not key.startswith("task.options."):
        return ValueError(f"unknown config key '{key}' (task options are set as 'task.options.{key[5:]}')")
    # 'ppo.lr' -> 'ppo.actor_lr': first a key of the same section whose name contains the typed one.
    section, _, leaf = key.rpartition(".")
    siblings = [k for k in _all_keys() if k.rpartition(".")[0] == section]
    match = [k for k in siblings if leaf and leaf in k.rpartition(".")[2]][:1]
    match = match or difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return ValueError(f"unknown config key '{key}'{hint}")


class _Raw:
    """A value typed on the command line: read as YAML unless the key expects a string."""

    def __init__(self, text: str) -> None:
        self.text = text

    def as_text(self) -> str:
        # YAML quoting still works ('  ' keeps its spaces); 'off' or '123' stay the text typed.
        parsed = self.parsed()
        return parsed if isinstance(parsed, str) else self.text

    def parsed(self) -> Any:
        try:
            return yaml.safe_load(self.text)
        except yaml.YAMLError:
            return self.text


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(repr(a) for a in choices)
    if origin is Union:
        parts = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a) for a in parts)
        return text + (" or null" if len(parts) < len(get_args(tp)) else "")
    if tp is dict or origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a float", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Mismatch(Exception):
    pass


def _coerce_one(tp: Any, value: Any) -> Any:
    """The value as type tp, or _Mismatch. _Raw values are strings for str/Literal keys, else YAML."""
    origin = get_origin(tp)
    if origin is Union:
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, _Raw) and value.parsed() is None)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce_one(arg, value)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        value = value.as_text() if isinstance(value, _Raw) else value
        if isinstance(value, str) and value in get_args(tp):
            return value
        raise _Mismatch
    if tp is str:
        value = value.as_text() if isinstance(value, _Raw) else value
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(value, _Raw):
        value = value.parsed()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        # YAML 1.1 reads '1e-6' (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(number):
            raise _Mismatch
        return number
    if tp is dict or get_origin(tp) is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return _plain(value)
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this module, not user input


def _plain(value: Any) -> Any:
    """A deep copy with _Raw leaves read as YAML (task options are free-form)."""
    if isinstance(value, _Raw):
        return value.parsed()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _coerce(key: str, tp: Any, value: Any) -> Any:
    try:
        return _coerce_one(tp, value)
    except _Mismatch:
        shown = value.text if isinstance(value, _Raw) else value
        raise _key_error(key, f"expects {_describe(tp)}, got {shown!r}") from None


# --------------------------------------------------------------------------- layers


Flat = Dict[str, Any]


def _flatten(layer: Any, source: str, cls: type = RunConfig, prefix: str = "") -> Flat:
    """A nested mapping checked against the schema -> {dotted key: typed value}."""
    if layer is None:  # `ppo:` with nothing under it
        return {}
    if not isinstance(layer, Mapping):
        where = f"config key '{prefix[:-1]}'" if prefix else "the top level"
        raise ValueError(f"{where} expects a mapping, got {layer!r} ({source})")
    hints = _hints(cls)
    flat: Flat = {}
    for name, value in layer.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in hints:
            raise ValueError(f"{_unknown_key(str(key))} ({source})")
        tp = hints[name]
        if _is_section(tp):
            if isinstance(value, _Raw):
                raise ValueError(f"config key '{key}' is a section: set one of its keys, e.g. '{key}.{next(iter(_hints(tp)))}' ({source})")
            flat.update(_flatten(value, source, tp, key + "."))
        else:
            try:
                flat[key] = _coerce(key, tp, value)
            except ValueError as error:
                raise ValueError(f"{error} ({source})") from None
    return flat


def _deep_merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> Dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _merge(layers: Iterable[Flat]) -> Flat:
    merged: Flat = {}
    for flat in layers:
        for key, value in flat.items():
            if key == "task.options" and key in merged:
                merged[key] = _deep_merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def _build(flat: Flat, cls: type = RunConfig, prefix: str = "") -> Any:
    kwargs = {}
    for name, tp in _hints(cls).items():
        key = prefix + name
        if _is_section(tp):
            kwargs[name] = _build(flat, tp, key + ".")
        elif key in flat:
            kwargs[name] = flat[key]
    return cls(**kwargs)


def parse_override(item: str) -> Tuple[str, str]:
    """'a.b=c' -> ('a.b', 'c'); the value is typed later, against the key it sets."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set expects KEY=VALUE with a dotted key (e.g. ppo.clip=0.2), got {item!r}")
    return key, text


def _override_layer(key: str, value: Any) -> Dict[str, Any]:
    layer: Dict[str, Any] = {}
    node = layer
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return layer


def _overrides_layer(overrides: Union[Sequence[str], Mapping[str, Any]], source: str) -> Flat:
    """--set items (strings, typed against their keys) or a {dotted key: value} mapping (sweeps)."""
    pairs: List[Tuple[str, Any]]
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = [(key, _Raw(text)) for key, text in map(parse_override, overrides)]
    layers = []
    for key, value in pairs:
        if key.startswith("task.options.") or key == "task.options":
            # Options are free-form below task.options, so the generic walk would reject them.
            options = _override_layer(key[len("task.options."):], value) if key != "task.options" else value
            layers.append(_flatten({"task": {"options": options}}, f"{source} {key}"))
        else:
            layers.append(_flatten(_override_layer(key, value), f"{source} {key}"))
    return _merge(layers)


# --------------------------------------------------------------------------- files


def read_yaml_file(path: Union[str, Path], what: str = "config file") -> Any:
    """A YAML file's content; a missing file or bad YAML is one line naming the file (and line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a YAML file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: malformed YAML in {what}: {problem}") from None


def _task_overlay_from_yaml(name: str) -> Dict[str, Any]:
    # Fallback while tre_cli.tasks has no task_overlay: the config sections of tasks/<name>.yaml
    # (its other top-level keys belong to the task module).
    path = Path(__file__).resolve().parent.parent / "tasks" / f"{name}.yaml"
    if not path.is_file():
        return {}
    content = read_yaml_file(path, "task file") or {}
    if not isinstance(content, Mapping):
        raise ValueError(f"task file {path} must contain a mapping, got {type(content).__name__}")
    return {key: value for key, value in content.items() if key in SECTIONS}


def load_task_overlay(name: str) -> Dict[str, Any]:
    """The task's config overlay: {section: {key: value}} (steps, max_new_tokens, eval metric...)."""
    if importlib.util.find_spec("tre_cli.tasks") is not None:
        tasks = importlib.import_module("tre_cli.tasks")
        if hasattr(tasks, "task_overlay"):
            return dict(tasks.task_overlay(name) or {})
    return _task_overlay_from_yaml(name)


# --------------------------------------------------------------------------- public API


def resolve(
    task: Optional[str] = None,
    method: Optional[str] = None,
    model: Optional[str] = None,
    preset: Optional[str] = None,
    config_file: Optional[Union[str, Path]] = None,
    overrides: Union[Sequence[str], Mapping[str, Any]] = (),
    *,
    task_overlay: Union[None, Mapping[str, Any], Callable[[str], Mapping[str, Any]]] = None,
    check_device: bool = True,
) -> RunConfig:
    """The run config from every layer (see the module docstring for the order).

    task_overlay: the overlay, or a function of the task name returning it, to use instead of the
    task's own (tests; a sweep that carries its own overlays).
    check_device: False where the config is resolved on another machine than the one that runs it
    (a Ray head without a GPU).
    """
    preset_layer: Flat = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        preset_layer = _flatten(PRESETS[preset], f"preset {preset}")
    file_layer: Flat = {}
    if config_file is not None:
        file_layer = _flatten(read_yaml_file(config_file), f"in {config_file}")
    flags = {k: v for k, v in (("task.name", task), ("method.name", method), ("model.name", model)) if v is not None}
    flag_layer = _flatten({s: {k: v} for s, k, v in ((key.split(".")[0], key.split(".")[1], value) for key, value in flags.items())}, "command-line flag")
    set_layer = _overrides_layer(overrides, "--set")

    # The overlay depends on the task name, which any layer above it may set.
    task_name = _merge([preset_layer, file_layer, flag_layer, set_layer]).get("task.name", TaskConfig.name)
    if task_overlay is None:
        overlay = load_task_overlay(task_name)
    elif callable(task_overlay):
        overlay = dict(task_overlay(task_name))
    else:
        overlay = dict(task_overlay)
    overlay_layer = _flatten(overlay, f"task overlay for {task_name!r}")
    if "task.name" in overlay_layer and overlay_layer["task.name"] != task_name:
        raise ValueError(f"the task overlay for {task_name!r} may not set task.name")

    config = _build(_merge([overlay_layer, preset_layer, file_layer, flag_layer, set_layer]))
    if check_device and config.run.device == "cuda":
        resolve_device("cuda")
    return config


def from_dict(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from a nested mapping (unspecified keys take their defaults); strict keys and types."""
    return _build(_flatten(data, source))


def to_dict(config: RunConfig) -> Dict[str, Any]:
    """A nested plain-data dict; method parameters the method does not have are left out."""
    data = dataclasses.asdict(config)
    data["method"] = {"name": config.method.name, **config.method.params}
    return data


def with_overrides(config: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """A copy with {dotted key: value} applied and validated (e.g. {'run.out': '...'})."""
    return _build(_merge([_flatten(to_dict(config), "config"), _overrides_layer(values, "override")]))


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """Write a file so that readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dump_yaml(config: RunConfig, path: Union[str, Path]) -> Path:
    """Write config as YAML atomically (a partial config.yaml never exists)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False))


def load_run_config(path: Union[str, Path]) -> RunConfig:
    """The config a run directory recorded (path: the config.yaml or the run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    return from_dict(read_yaml_file(path) or {}, f"in {path}")


def resolve_device(requested: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> 'cpu' | 'cuda'; asking for cuda without one is an error."""
    if requested == "cpu":
        return "cpu"
    import torch  # only here: the config itself needs no torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ValueError("--device cuda was requested but no CUDA device is available")
    if requested not in ("auto", "cuda"):
        raise _key_error("run.device", f"expects one of 'auto', 'cpu', 'cuda', got {requested!r}")
    return "cuda" if available else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """The torch dtype name to load weights in: 'auto' is bfloat16 on cuda, float32 on cpu."""
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return names[dtype]


def resolve_gradient_checkpointing(setting: Union[bool, str], device: str) -> bool:
    """'auto' trades compute for memory only where memory is the limit (cuda)."""
    if setting == "auto":
        return device == "cuda"
    return bool(setting)
