# Two entry points for people (README): `make demo` and `make test`. Both work on a fresh machine with
# only python3 (>= 3.11) installed: they create .venv, install pinned dependencies, then do their job.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip --disable-pip-version-check -q
# The CPU build of torch; installed alone and first, so nothing later pulls a CUDA build.
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.installed
# Debian's prometheus (server + promtool) for the observability tests; installed only where it is missing
# and we are root with apt-get (CI). Elsewhere those tests skip, saying why.
PROM_STAMP = $(VENV)/.prometheus

.PHONY: setup prometheus demo test lint typecheck unit e2e check-generated generate lock clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -c requirements/constraints.txt -e '.[worker,operator,analysis,dev]'
	touch $(STAMP)

setup: $(STAMP)

$(PROM_STAMP):
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || \
	  echo "note: Debian's prometheus package is not installed; the Prometheus tests will skip"
	@if command -v prometheus >/dev/null 2>&1; then mkdir -p $(VENV) && touch $@; fi

prometheus: $(PROM_STAMP)

demo: $(STAMP)
	$(BIN)/mlds run examples/quick.yaml --workers 2 --store runs/quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy contract worker operator cli

check-generated: $(STAMP)
	$(BIN)/python -m mlds_operator.generate --check

generate: $(STAMP)
	$(BIN)/python -m mlds_operator.generate

test: $(STAMP) $(PROM_STAMP) lint typecheck check-generated
	$(BIN)/python -m pytest -q

lock:
	$(PYTHON) -m venv /tmp/mlds-lock && /tmp/mlds-lock/bin/pip install -q $(TORCH) && \
	/tmp/mlds-lock/bin/pip install -q -e '.[worker,operator,analysis,dev]' && \
	{ echo "# Exact versions for every install (pip -c). Regenerate: make lock. torch is installed first, alone (see Makefile)."; \
	  /tmp/mlds-lock/bin/pip freeze | grep -v -iE '^(mlds|-e)' | sed 's/+cpu//'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
