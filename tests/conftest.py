"""Fixtures every test module may use (defined in fixtures_models.py)."""

from fixtures_models import quick_policy, quick_testbed, quick_tokenizer, tiny_llama, tiny_testbed  # noqa: F401 - fixtures
