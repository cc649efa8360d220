# Two entry points for a fresh machine; each installs what it needs into .venv first.
#   make demo   serve the bundled model over gRPC on loopback and stream the bundled sample through it
#   make test   run the test suite
#   make default-model   retrain the bundled default model (~35 min on 2 CPU cores)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean default-model

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/liveserve demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/liveserve bench engine --json out/bench-engine.json

default-model: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/build_default_model.sh

clean:
	rm -rf $(VENV) out .pytest_cache
