# streamtrain: `make demo` runs the daemon end to end, `make test` runs the whole suite.
# Each target sets up what it needs: a virtualenv in .venv with the project installed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch: on the development machines this version installs from a
# local file in seconds.  Override for CUDA, e.g. `make TORCH_SPEC='torch --index-url ...'`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-join test faults lint bench tools clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Tools some tests use (promtool, docker-compose, kcat), from Debian packages when missing.
tools:
	@missing=""; for t in promtool docker-compose kcat; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
		if [ "$$SUDO" = none ]; then echo "note:$$missing not installed and no root: the tests that need them will skip"; \
		else echo "installing prometheus (promtool), docker-compose, kcat from Debian packages"; \
			$$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus docker-compose kcat >/dev/null; fi; \
	fi

demo: $(BIN)/.installed
	$(BIN)/python demo/run_demo.py

demo-join: $(BIN)/.installed
	$(BIN)/python demo/run_join_demo.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(BIN)/.installed tools lint
	$(BIN)/python -m pytest -q -ra

# The fault suite alone (make test runs it too); prints the reliability table.
faults: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m fault

bench: $(BIN)/.installed
	$(BIN)/python -m bench.pipeline

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
