# pst-dist: every set-up step lives here, so a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision are pinned: on the dev/CI machines these exact wheels come from local disk;
# on GPU machines the same pins come from the registry.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all lint system-deps clean

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages: FFCV's build and runtime libraries (required: pip builds ffcv against them) and the
# Fashion-MNIST IDX files (optional: the synthetic data set needs nothing).
FFCV_APT := pkg-config libturbojpeg0-dev libopencv-dev
DATA_APT := dataset-fashion-mnist
system-deps:
	@missing=$$(for p in $(FFCV_APT) $(DATA_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then \
	  echo "system-deps: all present ($(FFCV_APT) $(DATA_APT))"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "system-deps: apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
	  echo "system-deps: need root apt-get for: $$missing (FFCV needs $(FFCV_APT); Fashion-MNIST is optional)"; \
	fi

# The whole install (apt prerequisites, venv, pinned torch, pst-dist with deepspeed / ffcv / ray[tune]); demo and
# test do it first, and the cluster recipes in cluster/ run it on every node.
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pst-dist demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=25

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pst_dist tests bench tune launch

clean:
	rm -rf $(VENV) runs .pytest_cache
