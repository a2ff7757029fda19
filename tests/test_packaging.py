"""The wheel carries what an installed `tre` needs: the task overlays, the sweep files, the testbed.

Builds the wheel from this checkout, installs it (no dependencies: they are this environment's)
into a scratch folder, and runs it from a folder outside the checkout, so that nothing can come
from the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command, **kwargs):
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, environment) of the wheel installed outside the checkout."""
    scratch = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(scratch / "dist"), str(ROOT)])
    (wheel,) = (scratch / "dist").glob("tre_cli-*.whl")
    site = scratch / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)])
    env = {**os.environ, "PYTHONPATH": str(site), "TRE_CACHE_DIR": str(scratch / "cache")}
    return wheel, site, env


@pytest.mark.slow
def test_wheel_holds_the_yaml_and_the_testbed(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("tasks", "sweeps"):
        shipped = sorted(path.name for path in (ROOT / folder).glob("*.yaml"))
        assert shipped, folder
        for name in shipped:
            assert f"tre_cli/_data/{folder}/{name}" in names
    for path in (ROOT / "tre_cli" / "models" / "testbed_weights").iterdir():
        assert f"tre_cli/models/testbed_weights/{path.name}" in names


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(installed, tmp_path):
    _, site, env = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import tre_cli, sys\n"
        f"assert tre_cli.__file__.startswith({str(site)!r}), tre_cli.__file__\n"
        "from tre_cli.config import resolve\n"
        "from tre_cli.models import resolve_model\n"
        "for task in ('countdown', 'math', 'hh'):\n"
        "    config = resolve(task=task, preset='paper', overrides=['run.out=x'])\n"
        "    print(task, config.rollout.max_new_tokens, config.ppo.steps)\n"
        "print(resolve_model('testbed'))\n"
    )
    done = _run([sys.executable, "-c", script], cwd=elsewhere, env=env)
    lines = done.stdout.split("\n")
    # The tasks' own T and steps (Table 2) come from the packaged overlays.
    assert lines[:3] == ["countdown 512 400", "math 8192 300", "hh 1024 300"]
    assert lines[3].startswith(str(site))
    done = _run([str(site / "bin" / "tre"), "sweep", "main", "--task", "countdown", "--dry-run",
                 "--out", str(tmp_path / "sweep")], cwd=elsewhere, env=env)
    assert "countdown" in done.stdout
    done = _run([str(site / "bin" / "tre"), "sweep", "horizon", "--preset", "smoke", "--dry-run",
                 "--out", str(tmp_path / "smoke")], cwd=elsewhere, env=env)
    assert "ent" in done.stdout
