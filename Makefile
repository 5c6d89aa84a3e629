# pst-dist: every set-up step lives here, so a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision are pinned: on the dev/CI machines these exact wheels come from local disk;
# on GPU machines the same pins come from the registry.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all lint system-deps clean

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages: Fashion-MNIST IDX files. Skipped with a message where apt-get cannot run;
# everything else still works (the synthetic data set needs nothing).
system-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && ls /usr/share/datasets/fashion-mnist/*ubyte* >/dev/null 2>&1; then \
	  echo "system-deps: Fashion-MNIST already present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "system-deps: WARNING could not install dataset-fashion-mnist; Fashion-MNIST runs will be unavailable"; \
	else \
	  echo "system-deps: apt-get unavailable or not root; skipping dataset-fashion-mnist (synthetic data still works)"; \
	fi

demo: $(STAMP)
	$(BIN)/pst-dist demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pst_dist tests bench tune launch

clean:
	rm -rf $(VENV) runs .pytest_cache
