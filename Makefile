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
SHM_OP := $(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/deepspeed_shm_comm.so
export HF_HUB_OFFLINE := 1

.PHONY: venv slurm demo test bench clean-data

venv: $(STAMP) $(SHM_OP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: these builds lie on local disk; anything else downloads GBs
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# deepspeed is an sdist that must see the torch above, hence no build isolation
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# DeepSpeed's CPU shared-memory comm op, built now, once, instead of in the first run (~60 s);
# build_ops fails unless the library is really there afterwards, and a missing one is rebuilt
$(SHM_OP): $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m launch.build_ops
	touch $@  # newer than the stamp: make does not ask again (ninja leaves an up-to-date library alone)

demo: venv
	$(PY) -m launch.demo $(ARGS)

# Debian's Slurm and munge for the tests that run slurm/train.sbatch on a loopback cluster.
# Installing needs root and Debian's package registry; without them those tests skip, saying why.
slurm:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing slurm-wlm and munge (Debian) for the Slurm tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1; } || \
	  echo "make: could not install slurm-wlm and munge: the Slurm tests will be skipped"; \
	else echo "make: slurm-wlm and munge need root and apt-get to install: the Slurm tests will be skipped"; fi

test: venv slurm
	$(PY) -m pytest $(ARGS)

bench: venv
	$(PY) -m sharding.benchmark $(ARGS)

clean-data:
	rm -rf data runs

# The wheels the GPU machine's image lacks, for the one-call GPU check (README: "GPU check";
# python -m launch.gpu_check). Needs PyPI. Fills the git-ignored .whl/ with each package at this
# venv's version, for CPython 3.12 on x86-64 Linux; deepspeed (an sdist) is built here as a pure
# wheel. Then checks names, versions, tags, one version each and the 64 MiB a device call carries;
# PY312=/path/to/python3.12 also installs them with the device's exact pip command and imports them.
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
.PHONY: gpu-bundle
gpu-bundle: venv
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $(GPU_WHEEL_PLATFORMS) \
	    -d .whl $$($(PY) -m launch.gpu_check --bundle-list downloads)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl $$($(PY) -m launch.gpu_check --bundle-list built)
	$(PY) -m launch.gpu_check --check-bundle .whl $(if $(PY312),--python312 $(PY312))
	@du -sh .whl
