# breastfusion: `make demo` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out

.PHONY: install demo test test-all lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/breastfusion run jobs/demo.yaml --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/ruff check platform tests benchmarks jobs
	$(BIN)/ruff format --check platform tests benchmarks jobs

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
