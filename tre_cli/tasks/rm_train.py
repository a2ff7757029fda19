"""Train a Bradley-Terry reward model for the HH task with TRL's RewardTrainer.

TRL is the library the paper used; its trainer implements the pairwise loss
-log sigmoid(r_chosen - r_rejected) plus the centring term coef * mean((r_c + r_r)^2) and
renders conversational pairs with the tokenizer's chat template, which is what the HH scorer
(tre_cli.tasks.hh) renders at scoring time.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from tre_cli.tasks.base import is_local_source, read_hub_rows, read_local_rows
from tre_cli.tasks.hh import prompt_of

@dataclass(frozen=True)
class RewardTrainingConfig:
    """The paper's Appendix A.1 defaults: 3 epochs, lr 1e-5, cosine, warm-up 0.1,
    centre-rewards coefficient 0.01, global batch 512, sequences up to 2,048 tokens."""

    epochs: float = 3.0
    learning_rate: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    center_rewards_coefficient: float = 0.01
    batch_size: int = 512
    per_device_batch_size: int = 8
    max_length: int = 2048
    seed: int = 42
    limit: int | None = None
    gradient_checkpointing: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.per_device_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if self.batch_size % self.per_device_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of per_device_batch_size {self.per_device_batch_size}"
            )


def _text(value: Any) -> str:
    """A completion given as a string, or as a message list ending with the assistant turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    raise ValueError(f"a preference completion must be a string or a message list, got {type(value).__name__}")


def preference_pairs(rows: list[Mapping[str, Any]]) -> list[dict]:
    """Rows with prompt/chosen/rejected (strings or conversations) -> TRL's conversational
    explicit-prompt format, so the trainer applies the chat template."""
    pairs = []
    for index, row in enumerate(rows):
        if "chosen" not in row or "rejected" not in row:
            raise ValueError(f"preference row {index} needs 'chosen' and 'rejected', got keys {sorted(row)}")
        pairs.append(
            {
                "prompt": [{"role": "user", "content": prompt_of(row)}],
                "chosen": [{"role": "assistant", "content": _text(row["chosen"])}],
                "rejected": [{"role": "assistant", "content": _text(row["rejected"])}],
            }
        )
    return pairs


def load_preference_rows(data: str, split: str = "train", limit: int | None = None) -> list[dict]:
    if is_local_source(data):
        rows = read_local_rows(data, split)
        return rows if limit is None else rows[:limit]
    return read_hub_rows(data, split, split, 0, limit, None)


def train_reward_model(base_model: str, data: str, out_dir: str | Path, config: RewardTrainingConfig) -> dict:
    """Fine-tune `base_model` with a scalar head on preference pairs; save model + tokenizer
    to `out_dir` (loadable by the HH scorer) and return the final training metrics."""
    try:
        import datasets
        from trl import RewardConfig, RewardTrainer
    except ImportError:
        raise ValueError("`tre rm train` needs TRL: pip install 'tre-cli[rm]'") from None
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output folder {out_dir} is not empty; choose a new one")
    pairs = preference_pairs(load_preference_rows(data, limit=config.limit))
    if not pairs:
        raise ValueError(f"no preference pairs in {data}")

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    use_cuda = torch.cuda.is_available()
    world_size = max(1, torch.cuda.device_count()) if use_cuda else 1
    accumulation = max(1, config.batch_size // (config.per_device_batch_size * world_size))
    # The trainer's scratch folder (logs, no checkpoints) is not part of the saved model.
    scratch = tempfile.TemporaryDirectory(prefix="tre-rm-")
    args = RewardConfig(
        output_dir=scratch.name,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        center_rewards_coefficient=config.center_rewards_coefficient,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        max_length=config.max_length,
        seed=config.seed,
        bf16=use_cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=config.gradient_checkpointing,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        use_cpu=not use_cuda,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    try:
        result = trainer.train()
    finally:
        scratch.cleanup()
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float))}
    history = [entry for entry in trainer.state.log_history if "accuracy" in entry]
    if history:
        metrics["final_accuracy"] = history[-1]["accuracy"]
    summary = {
        "base_model": base_model,
        "data": data,
        "pairs": len(pairs),
        "config": asdict(config),
        "metrics": metrics,
    }
    (out_dir / "tre_reward_model.json").write_text(json.dumps(summary, indent=2))
    return summary
