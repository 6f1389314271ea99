# The two Quickstart commands. TORCH pins the CPU build of torch that CI uses; on a GPU machine with its own torch,
# run with TORCH= to keep it (e.g. `make test TORCH=`).
PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -n 2 -q --durations=30

.PHONY: install-demo install-dev demo lint test test-fast

install-demo:
	$(PYTHON) -m pip install $(TORCH) -e ".[demo]"

install-dev:
	$(PYTHON) -m pip install $(TORCH) -e ".[dev]"

demo: install-demo
	lightning-llm-demo --output-dir outputs/demo

lint:
	$(PYTHON) -m ruff check .

# everything: lint, then the whole suite (slow tests included), with the 30 slowest tests listed
test: install-dev lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# the quick loop: no install, no multi-process or long-running tests
test-fast:
	$(PYTHON) -m pytest -n 2 -q -m "not slow"
