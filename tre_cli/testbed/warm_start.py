"""The testbed's model: a Qwen2 config sized by the recipe, and the supervised warm start."""

from __future__ import annotations

import math
import random

import torch


def build_config(spec: dict, tokenizer):
    from transformers import Qwen2Config

    padded_vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    return Qwen2Config(
        vocab_size=padded_vocab,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=True,
        rope_theta=10_000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _sft_batches(sequences: list[tuple[list[int], int]], batch_size: int, steps: int, seed: int, pad_id: int):
    """Right-padded (input_ids, labels, attention_mask) batches; labels only on the response."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(sequences)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chosen, order = order[:batch_size], order[batch_size:]
        width = max(len(sequences[i][0]) for i in chosen)
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, index in enumerate(chosen):
            ids, prompt_length = sequences[index]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
            attention_mask[row, : len(ids)] = 1
        yield input_ids, labels, attention_mask


def supervised_warm_start(model, sequences, spec: dict, pad_id: int, log=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every step."""
    steps, warmup = spec["steps"], spec["warmup_steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.98), weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step, (input_ids, labels, attention_mask) in enumerate(
        _sft_batches(sequences, spec["batch_size"], steps, spec["seed"], pad_id)
    ):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()
    return losses
