# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck bench run clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>/dev/null || true
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import careloop, fastapi, hl7"  # fail here, clearly, if the install did not work
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/careloop demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check careloop connectors mapping orchestrator channels audit tests bench

typecheck: $(STAMP)
	$(BIN)/mypy careloop connectors mapping orchestrator channels audit tests bench

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

run: $(STAMP)
	$(BIN)/careloop run --config fixtures/config/example.yaml

clean:
	rm -rf $(VENV) var build *.egg-info
