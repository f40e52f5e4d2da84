# The two commands of the README: `make run` (the smoke pipeline) and `make test` (the tests).
# Both create the environment first when it is missing or older than the dependency files.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Prefect starts a temporary local server when no PREFECT_API_URL is set; its default 20 s
# start-up limit is too tight for a loaded 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: env run test lint clean

env: $(STAMP)

# One pip command resolves the whole set; requirements.lock pins every transitive version.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/samclip run --profile smoke

test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not testbed" $(PYTEST_ARGS)

# The reduced claims run: both testbed teachers trained, distilled and compared (minutes).
.PHONY: test-testbed
test-testbed: $(STAMP)
	$(VENV)/bin/pytest -q -m testbed $(PYTEST_ARGS)

# Stage-2 speed through Ray Train against a plain torch loop; the last line is machine-readable.
.PHONY: bench-train
bench-train: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_train.py

lint: $(STAMP)
	$(VENV)/bin/python -m ruff check samclip tests || true

clean:
	rm -rf runs

# Ray Data precompute against a plain torch loop: images/s, peak memory, MFU (see the script).
bench-precompute: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_precompute.py $(BENCH_ARGS)

# Create or update the deployments of prefect.yaml on the server at PREFECT_API_URL.
.PHONY: deploy
deploy: $(STAMP)
	@test -n "$$PREFECT_API_URL" || { echo "set PREFECT_API_URL to your Prefect server's API, e.g. http://127.0.0.1:4200/api"; exit 2; }
	$(VENV)/bin/prefect --no-prompt deploy --all
