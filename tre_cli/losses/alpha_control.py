"""Alpha controllers: how the bonus weight alpha moves between steps (`method.alpha_control`).

- "fixed": alpha stays `method.alpha` (the paper).
- "target": Skywork-OR1's rule applied to the quantity each method regularizes: after each step,
  alpha += alpha_step while the method's own entropy (the token mean of its bonus: Ent the full
  entropy, TRE-K/TRE-P the region-normalised entropy, Min-Ent the min-entropy) is below
  `method.target_entropy`, alpha -= alpha_step while above, unchanged at equality, clipped to
  [0, alpha_max]. It starts at `method.alpha`. As in Skywork-OR1's controller the bonus is
  applied only while the entropy is below the target (`applied`): a step after one whose
  entropy was at or above the target trains with alpha 0 (the first step, with no entropy
  measured yet, applies alpha). The entropy it reads is the previous step's (one step behind).

Pure python (no torch): the state is one float, saved in the checkpoint so a resumed run is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

CONTROLS = ("fixed", "target")


def next_alpha(alpha: float, entropy: float, target: float, step: float, alpha_max: float) -> float:
    """One update of the "target" rule."""
    if entropy < target:
        alpha = alpha + step
    elif entropy > target:
        alpha = alpha - step
    return min(max(alpha, 0.0), alpha_max)


@dataclass
class AlphaController:
    """The current alpha of a run and the rule that moves it."""

    alpha: float
    control: str = "fixed"
    target: float | None = None
    step: float = 0.0
    alpha_max: float = 0.0
    # The last step's regularized entropy (None before the first update).
    entropy: float | None = None

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ValueError(f"unknown alpha control {self.control!r}; choose one of: {', '.join(CONTROLS)}")
        if self.control == "target" and self.target is None:
            raise ValueError("alpha control 'target' needs a target entropy")

    @staticmethod
    def of(params: Mapping[str, Any], alpha: float) -> AlphaController:
        """From a method's resolved parameters and its starting alpha (0 without a bonus)."""
        control = str(params.get("alpha_control", "fixed"))
        if control == "fixed":
            return AlphaController(alpha)
        return AlphaController(alpha, control, float(params["target_entropy"]), float(params["alpha_step"]),
                               float(params["alpha_max"]))

    @property
    def adapts(self) -> bool:
        return self.control != "fixed"

    @property
    def applied(self) -> float:
        """The alpha the next step trains with: 0 under "target" while the last entropy was at or
        above the target (Skywork-OR1 applies the entropy loss only below it)."""
        if not self.adapts or self.entropy is None or self.entropy < float(self.target):
            return self.alpha
        return 0.0

    def update(self, entropy: float) -> float:
        """After a step whose regularized entropy was `entropy`: the next step's alpha."""
        if self.adapts:
            self.entropy = float(entropy)
            self.alpha = next_alpha(self.alpha, self.entropy, float(self.target), self.step, self.alpha_max)
        return self.alpha

    def state_dict(self) -> dict[str, float | None]:
        return {"alpha": float(self.alpha), "entropy": self.entropy}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        entropy = state.get("entropy")
        self.entropy = None if entropy is None else float(entropy)
