"""Policy, critic and tokenizer from a hub id, a local directory, or the built-in `testbed`.

Local first, network last: a name that is a directory is used as is; `testbed` is the copy that
ships with the package (tre_cli/models/testbed_weights/); anything else is a hub id, taken from
the local hub cache when it is there and downloaded only when the hub answers within a few
seconds. Every failure is one line that names the model and says how to pass a local path.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
from torch import nn

from tre_cli.models.precision import Precision, autocast_for, set_compute_precision

TESTBED_NAME = "testbed"
HUB_PROBE_SECONDS = 5.0
# Files a causal LM needs; skipping the rest (onnx, gguf, original/...) keeps a download small.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU (the paper's setting), float32 on CPU where bf16 matmuls are slow and lossy."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_root() -> Path:
    """$TRE_CACHE_DIR, else $XDG_CACHE_HOME/tre, else ~/.cache/tre."""
    if os.environ.get("TRE_CACHE_DIR"):
        return Path(os.environ["TRE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tre"


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that is not a directory is a missing path.
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers an HTTPS connection within `timeout` seconds.

    Name resolution can block far longer than any socket timeout on a machine without a
    network, so the probe runs in a daemon thread that is simply abandoned when it is late.
    """
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _unreachable(name: str, why: str) -> ValueError:
    return ValueError(
        f"model {name!r} is not a local directory and {why}; "
        f"pass a local path with --model /path/to/model (or --model {TESTBED_NAME})"
    )


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The local directory holding the model called `name_or_path`.

    `testbed` is the shipped built-in model (checksums verified); an existing directory is
    returned as is; anything else is a hub id, taken from the hub cache or downloaded.
    """
    name = str(name_or_path).strip()
    if not name:
        raise ValueError("model name is empty; pass a hub id, a local path or 'testbed'")
    if name == TESTBED_NAME:
        from tre_cli.models.testbed import shipped_testbed

        return shipped_testbed()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    if path.exists():
        raise ValueError(f"model path {path} is a file; pass the directory that holds config.json")
    if _looks_like_path(name):
        raise FileNotFoundError(f"model directory not found: {path}")
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise _unreachable(repo_id, "huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
    except Exception:  # not in the local hub cache: only then go to the network
        pass
    if _hub_offline():
        raise _unreachable(repo_id, "HF_HUB_OFFLINE is set and it is not in the local hub cache")
    if not _hub_reachable():
        raise _unreachable(repo_id, "the hub cannot be reached")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, etag_timeout=HUB_PROBE_SECONDS))
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise _unreachable(repo_id, f"the hub download failed ({reason})") from None


def load_tokenizer(name_or_path: str | os.PathLike):
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if _saved_as_generic_fast_tokenizer(path):
        # transformers picks a tokenizer class from the model type (qwen2 -> Qwen2Tokenizer, which
        # rebuilds its own pre-tokenizer and so changes the ids of a tokenizer saved as a plain
        # fast tokenizer, like the testbed's): load what was saved instead.
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _saved_as_generic_fast_tokenizer(path: Path) -> bool:
    config = Path(path) / "tokenizer_config.json"
    if not config.is_file() or not (Path(path) / "tokenizer.json").is_file():
        return False
    try:
        saved_class = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_policy(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    precision: Precision | None = None,
) -> nn.Module:
    """A causal LM (the policy) on `device`; bf16 by default on a GPU, float32 on CPU.

    With `precision` (training): the weights are loaded in `precision.params` (the fp32 masters)
    and every forward through `autocast_for(model)` computes in `precision.compute`; `dtype` is
    then ignored."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    torch_dtype = precision.params if precision is not None else resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device)
    if precision is not None:
        set_compute_precision(model, precision)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with inputs that need no grad and with torch.compile.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


class ValueModel(nn.Module):
    """The critic: the policy's base transformer with a scalar value head on every position.

    The head is a Linear(hidden, 1) with a bias, no dropout, weights drawn from N(0, std^2) and a
    zero bias. `value_head_std=None` takes the model's own `initializer_range` (0.02 for Qwen2.5):
    what the released code gets from transformers' token-classification head, whose dropout verl
    sets to 0. A small std (e.g. 1e-3) starts the critic near V = 0 instead."""

    def __init__(self, backbone: nn.Module, value_head_std: float | None = None):
        super().__init__()
        self.backbone = backbone
        hidden_size = backbone.config.hidden_size
        if value_head_std is None:
            value_head_std = float(getattr(backbone.config, "initializer_range", 0.02))
        if not value_head_std > 0:
            raise ValueError(f"value head init std must be > 0, got {value_head_std}")
        # float32 head: values feed GAE and a squared loss, where bf16 rounding would add noise.
        self.value_head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=_device_of(backbone))
        nn.init.normal_(self.value_head.weight, std=value_head_std)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Values [B, T] (float32), one per input position."""
        with autocast_for(self):
            hidden = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        # The head in float32 even inside a caller's autocast region, on the rows of a 2-D view of
        # the hidden states, and the values copied out of the [B * T, 1] result: neither the
        # head's output nor the model's is a view, which FSDP2's units warn about (an in-place
        # op on a view would skip their backward hooks).
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            rows = self.value_head(hidden.float().reshape(-1, hidden.shape[-1]))
            return rows.reshape(hidden.shape[:-1]).clone()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def load_critic(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    value_head_std: float | None = None,
    precision: Precision | None = None,
) -> ValueModel:
    """A critic initialised from the same base model as the policy (the LM head is dropped).
    `precision` and `value_head_std` as in `load_policy` and `ValueModel`."""
    from transformers import AutoModel

    path = resolve_model(name_or_path)
    torch_dtype = precision.params if precision is not None else resolve_dtype(dtype, device)
    backbone = AutoModel.from_pretrained(str(path), dtype=torch_dtype).to(device)
    if gradient_checkpointing:
        _enable_checkpointing(backbone)
    critic = ValueModel(backbone, value_head_std=value_head_std)
    if precision is not None:
        set_compute_precision(critic, precision)
    return critic


__all__ = [
    "TESTBED_NAME",
    "ValueModel",
    "cache_root",
    "default_dtype",
    "load_critic",
    "load_policy",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model",
]
