# pst-dist: every set-up step lives here, so a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision are pinned: on the dev/CI machines these exact wheels come from local disk;
# on GPU machines the same pins come from the registry.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all lint system-deps clean gpu-wheels

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-deps
	$(BIN)/python -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PY) -m venv $(VENV); }
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages: FFCV's build and runtime libraries (required: ffcv is a source package pip compiles, against
# them, with a C++ compiler and the Python headers; python3-venv for the system Python's venv) and the Fashion-MNIST
# IDX files (optional: the synthetic data set needs nothing; installed on their own, so a system without the package
# still gets the required ones).
FFCV_APT := build-essential python3-dev python3-venv pkg-config libturbojpeg0-dev libopencv-dev
DATA_APT := dataset-fashion-mnist
system-deps:
	@missing=$$(for p in $(FFCV_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	optional=$$(for p in $(DATA_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing$$optional" ]; then \
	  echo "system-deps: all present ($(FFCV_APT) $(DATA_APT))"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq; \
	  if [ -n "$$missing" ]; then \
	    echo "system-deps: apt-get install $$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  fi; \
	  if [ -n "$$optional" ]; then \
	    echo "system-deps: apt-get install $$optional (optional)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$optional >/dev/null \
	      || echo "system-deps: $$optional not installed (optional: the demo uses the synthetic data set)"; \
	  fi; \
	else \
	  echo "system-deps: need root apt-get for: $$missing $$optional (FFCV needs $(FFCV_APT); Fashion-MNIST is optional)"; \
	fi

# The whole install (apt prerequisites, venv, pinned torch, pst-dist with deepspeed / ffcv / ray[tune]); demo and
# test do it first, and the cluster recipes in cluster/ run it on every node.
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pst-dist demo

# The default suite in TEST_WORKERS pytest-xdist processes (whole test files to each, so a module's shared fixture is
# made once): on 2 cores about 18 minutes instead of 25 one after another. TEST_WORKERS=0: in this process alone.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=25

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pst_dist tests bench tune launch

# What a lent GPU machine without a package registry needs for launch/gpu_checks.sh (../shared/GPU.md: Python 3.12,
# torch and timm there; no deepspeed or pytest): DeepSpeed built here (pure Python), its and pytest's dependencies
# downloaded for CPython 3.12 on manylinux, into .whl/ (git-ignored: carry it to the machine). Made whole, then renamed.
GPU_PY := 3.12
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 msgpack==1.2.4 py-cpuinfo==9.0.0 einops==0.8.2 psutil==7.2.2 \
	pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments
gpu-wheels: $(STAMP)
	rm -rf .whl.tmp && mkdir .whl.tmp
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w .whl.tmp deepspeed==0.19.8
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
	  -d .whl.tmp $(GPU_WHEELS)
	rm -rf .whl && mv .whl.tmp .whl && ls .whl

# The venv and caches only: runs/ holds results (bench cells, poisons, searches) that took hours; remove what you
# no longer want yourself.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
