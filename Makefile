# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?= --days 3 --users 1000 --experts 60 --seed 0

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/rec demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check rec dags data_checks tests bench
	$(BIN)/python -m rec.sqllint

test: lint
	$(BIN)/pytest

clean:
	rm -rf .rec .pytest_cache
