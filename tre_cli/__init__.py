"""tre: PPO fine-tuning of language models with Trust Region Entropy and its baselines."""

__version__ = "0.1.0"
