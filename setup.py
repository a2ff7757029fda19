"""Copies the top-level tasks/ and sweeps/ YAML into the wheel as tre_cli/_data/ (see tre_cli/resources.py).

Everything else about the package is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_FOLDERS = ("tasks", "sweeps")


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        for folder in DATA_FOLDERS:
            source = here / folder
            files = sorted(source.glob("*.yaml"))
            if not files:
                raise RuntimeError(f"{source} has no YAML files to ship")
            target = Path(self.build_lib) / "tre_cli" / "_data" / folder
            target.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copyfile(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithData})
