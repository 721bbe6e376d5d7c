# The two commands of the README's quick start: `make demo` and `make test`.
# Each sets up its own virtual environment first (torch pinned to the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Until the trained demo model ships, the demo generates from a freshly initialised tiny model:
# the pictures are noise, but every stage of the nightly job runs (local Ray, local files).
demo: setup
	$(VENV)/bin/painter new-model --preset tiny --output $(OUT)/model
	$(VENV)/bin/painter generate --input examples/prompts.tsv --model $(OUT)/model --output $(OUT)/generated --samples 2

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) out
