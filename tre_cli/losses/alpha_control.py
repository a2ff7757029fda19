"""Alpha controllers: how the bonus weight alpha moves between steps (`method.alpha_control`).

- "fixed": alpha stays `method.alpha` (the paper).
- "target": Skywork-OR1's rule applied to the quantity each method regularizes: after each step,
  alpha += alpha_step while the method's own entropy (the token mean of its bonus: Ent the full
  entropy, TRE-K/TRE-P the region-normalised entropy, Min-Ent the min-entropy) is below
  `method.target_entropy`, alpha -= alpha_step while above, unchanged at equality, clipped to
  [0, alpha_max]. It starts at `method.alpha`.

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

    def update(self, entropy: float) -> float:
        """After a step whose regularized entropy was `entropy`: the next step's alpha."""
        if self.adapts:
            self.alpha = next_alpha(self.alpha, float(entropy), float(self.target), self.step, self.alpha_max)
        return self.alpha

    def state_dict(self) -> dict[str, float]:
        return {"alpha": float(self.alpha)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state["alpha"])
