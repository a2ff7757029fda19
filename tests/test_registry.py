"""The registry is the one description of each method: consistent, importable without torch,
and the only place in tre_cli that names a method."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tre_cli.losses.registry import (
    DEFAULT_METHOD,
    METHODS,
    SCOPE_GLOBAL,
    SCOPE_GROUP,
    SELECTION_SCOPES,
    Display,
    Method,
    ParamError,
    all_params,
    baseline,
    get_method,
    ordered,
)

ROOT = Path(__file__).resolve().parents[1]


def test_registry_roles_are_well_formed():
    assert DEFAULT_METHOD in METHODS
    assert [m.name for m in METHODS.values() if m.display.baseline] == [baseline().name]
    assert len([m for m in METHODS.values() if m.display.horizon_sweep]) == 1
    assert sorted(m.display.row for m in METHODS.values()) == list(range(1, len(METHODS) + 1))
    for method in METHODS.values():
        assert set(method.display.variant_params) <= set(method.defaults)
        assert (method.bonus is None) == ("alpha" not in method.defaults)
        assert method.resolve_params({}) == method.defaults
        figure4 = method.display.figure4
        if figure4 is not None and figure4.param is not None:
            assert figure4.param in method.defaults


def test_presentation_is_apart_from_the_maths():
    # A method's label, order, colours and figures live in its Display; no field is in both.
    assert not {f.name for f in dataclasses.fields(Method)} & {f.name for f in dataclasses.fields(Display)}
    for method in METHODS.values():
        assert isinstance(method.display, Display)
        assert all(not callable(getattr(method.display, f.name)) for f in dataclasses.fields(Display))


def test_one_vocabulary_of_selection_scopes():
    for method in METHODS.values():
        if "scope" in method.defaults:
            assert method.param("scope").choices == SELECTION_SCOPES == (SCOPE_GROUP, SCOPE_GLOBAL)
            assert method.selector(method.resolve_params({})).scope == SCOPE_GROUP


def test_a_parameter_name_means_one_parameter():
    for method in METHODS.values():
        for param in method.params:
            shared = all_params()[param.name]
            assert (param.kind, param.choices) == (shared.kind, shared.choices), param.name


def test_parameters_are_checked_against_their_ranges():
    tre_p = get_method("tre-p")
    assert tre_p.resolve_params({"p": 1.0})["p"] == 1.0
    with pytest.raises(ParamError, match=r"must be in \(0, 1\], got 0"):
        tre_p.resolve_params({"p": 0})
    with pytest.raises(ParamError, match="is not a parameter of method 'tre-p'"):
        tre_p.resolve_params({"k": 3})
    with pytest.raises(ParamError, match="must be an integer >= 2, got 0"):
        get_method("tre-k").resolve_params({"k": 0})
    with pytest.raises(ParamError, match=r"got 1 \(K = 1 is Min-Ent, -log max pi: use method min-ent\)"):
        get_method("tre-k").resolve_params({"k": 1})
    with pytest.raises(ParamError, match="must be one of 'group', 'global'"):
        get_method("forking-tokens").resolve_params({"scope": "everywhere"})


def test_table1_order_puts_base_first_and_unknown_names_last():
    assert ordered(["tre-p", "zzz", "base", "vanilla", "kl-cov"]) == ["base", "vanilla", "kl-cov", "tre-p", "zzz"]


def test_config_report_and_sweep_import_without_torch():
    code = ("import sys, tre_cli.losses.registry, tre_cli.config, tre_cli.report, tre_cli.sweep, tre_cli.tracking; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_no_module_outside_the_registry_names_a_method():
    names = "|".join(re.escape(name) for name in METHODS)
    quoted = re.compile(rf"""["']({names})["']""")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "tre_cli").rglob("*.py")) if path.name != "registry.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if quoted.search(line)
    ]
    assert not offenders, "\n".join(offenders)


def test_no_module_is_over_600_lines():
    """The house's rule (issue 14): a module that grows past 600 lines is split by concern."""
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in sorted((ROOT / "tre_cli").rglob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600]
    assert not long, "\n".join(long)
