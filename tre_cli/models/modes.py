"""Train and eval modes for the trainer's passes.

transformers loads a model in eval mode, and its decoder layers checkpoint only in training mode
(`gradient_checkpointing and self.training`): a model that stays in eval mode never checkpoints,
whatever `gradient_checkpointing_enable` was told. The update passes (forward + backward) run in
training mode, so that checkpointing is active when on; the no-grad passes (old log-probs,
values, token selection) and sampling run in eval mode.

Dropout is whatever the model's config says in training mode: Qwen2.5's `attention_dropout` is
0.0 and Qwen2 has no other dropout, as in the released code (verl trains the actor with its
config unchanged, and sets the critic head's dropout to 0), so both modes compute the same
function for the paper's models; `dropout_probabilities` lists what a model would apply.
"""

from __future__ import annotations

from torch import nn


def set_training(training: bool, *modules: nn.Module) -> None:
    """Put every module (and its children) in training (True) or eval (False) mode."""
    for module in modules:
        module.train(training)


def dropout_probabilities(module: nn.Module) -> dict[str, float]:
    """The dropout a module applies in training mode: nn.Dropout layers and the `*dropout*`
    floats of its config (attention dropout is a functional argument, not a layer), by name;
    only the nonzero ones."""
    found: dict[str, float] = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.modules.dropout._DropoutNd) and child.p > 0:
            found[name or "<root>"] = float(child.p)
    config = getattr(module, "config", None)
    if config is not None:
        for key, value in vars(config).items():
            if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found[f"config.{key}"] = float(value)
    return found
