# The README's two commands: `make demo` (the synthetic SSv2 demo end to end) and `make test`.
# Both create or reuse .venv/ in the repo root; nothing else needs installing by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed JIT-builds its CPU ops once; keep them beside the venv so every later process
# (tests, launchers, ranks) reuses the build instead of recompiling for ~70 s.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test bench clean-data

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: these builds lie on local disk; anything else downloads GBs
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# deepspeed is an sdist that must see the torch above, hence no build isolation
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e '.[test]'
	# build DeepSpeed's CPU shared-memory comm op now, once, instead of in the first test
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

demo: venv
	$(PY) -m launch.demo $(ARGS)

test: venv
	$(PY) -m pytest $(ARGS)

bench: venv
	$(PY) -m sharding.benchmark $(ARGS)

clean-data:
	rm -rf data runs
