"""The command line: version, help, the methods table."""

from __future__ import annotations

from typer.testing import CliRunner

from tre_cli import __version__
from tre_cli.cli import app
from tre_cli.losses.registry import METHODS, get_method

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"tre {__version__}"


def test_help_lists_methods_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "methods" in result.stdout


def test_methods_lists_every_method_with_its_defaults():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name, method in METHODS.items():
        assert name in result.stdout
        for key, value in method.defaults.items():
            assert f"{key}={value}" in result.stdout


def test_methods_say_what_compat_does_and_that_k_1_is_min_ent():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert "released_code_compat: the released runtime's nucleus (top 256 only; bf16 logits, float32 mass)" in \
        result.stdout
    assert "(K >= 2; K = 1 is min-ent)" in result.stdout


def test_registry_is_consistent():
    assert set(METHODS) == {"vanilla", "ent", "tre-k", "tre-p", "min-ent", "forking-tokens", "kl-cov"}
    for method in METHODS.values():
        if method.bonus is not None:
            assert method.defaults["alpha"] == 0.001  # the paper's alpha for every regularizer
    assert METHODS["kl-cov"].defaults["ratio"] == 0.002  # the released code, not the paper's 20%
    assert get_method("tre-k").region({"k": 2}).k == 2
    assert get_method("tre-p").region({"p": 0.99}).p == 0.99
    assert get_method("ent").region({}) is None


def test_unknown_method_names_the_choices():
    import pytest

    with pytest.raises(ValueError, match="unknown method 'tre-x'.*tre-p"):
        get_method("tre-x")
