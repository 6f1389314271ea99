# The two Quickstart commands. TORCH pins the CPU build of torch that CI uses; on a GPU machine with its own torch,
# run with TORCH= to keep it (e.g. `make test TORCH=`).
PYTHON ?= python3
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -n 2 -q

.PHONY: install-demo install-dev demo test

install-demo:
	$(PYTHON) -m pip install $(TORCH) -e ".[demo]"

install-dev:
	$(PYTHON) -m pip install $(TORCH) -e ".[dev]"

demo: install-demo
	lightning-llm-demo --output-dir outputs/demo

test: install-dev
	$(PYTHON) -m pytest $(PYTEST_ARGS)
