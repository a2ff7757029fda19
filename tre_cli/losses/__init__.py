"""Pure torch losses: per-token statistics, regularizers, token selectors and PPO pieces."""
