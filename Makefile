# `make test` and `make demo` work on a fresh machine: they create .venv at the repo root first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/losses.py

clean:
	rm -rf $(VENV) build *.egg-info

# Until the trainer lands, the demo shows the methods and the loss library on random logits.
demo: $(VENV)/.installed
	$(VENV)/bin/tre methods
	$(PY) bench/losses.py --quick
