# preflight: `make demo` runs the embedded stack and a real deployment; `make test` runs everything.
# Both install what they need into .venv from this repository's own files.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv browser demo up test lint typecheck unit integration e2e schemas render bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,benchmark]'
	@touch $(STAMP)

venv: $(STAMP) ## Create .venv and install preflight with its dev tools

# The rollout page is tested in headless Chromium (Debian's package; no browser download).
# Without root or apt the page test skips and says why; everything else still runs.
browser: ## Install Debian's chromium for the rollout-page test, if missing
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian) for the rollout-page browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	  || echo "warning: could not install chromium; the rollout-page browser test will skip"; }

demo: $(STAMP) ## Start the embedded stack, deploy generated sample models, show the outcomes, stop; then again through a real Envoy
	$(BIN)/preflight demo
	$(BIN)/preflight demo --data-plane envoy

up: $(STAMP) ## Run the embedded stack until Ctrl-C
	$(BIN)/preflight up

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict over services, tests and bench
	$(BIN)/mypy

schemas: $(STAMP) ## Regenerate schemas/ from the contracts
	$(BIN)/preflight schemas

unit: $(STAMP) ## Unit and component tests only (no servers)
	$(BIN)/pytest tests/unit tests/component -q

integration: $(STAMP) browser ## Tests on a real nats-server and chDB
	$(BIN)/pytest tests/integration -q

e2e: $(STAMP) browser ## The embedded stack end to end
	$(BIN)/pytest tests/e2e -q

test: $(STAMP) browser ## Lint, type checks, schema freshness and the whole suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/preflight schemas --check
	$(BIN)/pytest -q

render: $(STAMP) ## Regenerate the derived deploy files (ClickHouse init SQL, k8s config copies)
	$(BIN)/python deploy/render.py

bench: $(STAMP) ## Run the benchmark scripts (figures for docs/benchmarks.md; several minutes)
	$(BIN)/python bench/bus_hop.py
	$(BIN)/python bench/validator_bench.py
	$(BIN)/python bench/benchmarker_bench.py
	$(BIN)/python bench/ingest_bench.py
	$(BIN)/python bench/router_bench.py
	$(BIN)/python bench/canary_sim.py
	$(BIN)/python bench/canary_real.py
	$(BIN)/python bench/notifier_bench.py
	$(BIN)/python bench/rollout_page.py
	$(BIN)/python bench/analyse_bench.py

clean: ## Remove the venv, caches and the embedded stack's data
	rm -rf $(VENV) .preflight .pytest_cache .mypy_cache .ruff_cache
