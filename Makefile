# Two entry points for a fresh machine; each installs what it needs into .venv first.
#   make demo   stream the bundled sample video through the bundled tiny model
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/liveserve run --max-new-tokens 24

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/liveserve bench engine --json out/bench-engine.json

clean:
	rm -rf $(VENV) out .pytest_cache
