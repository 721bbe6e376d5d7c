# The two commands of the README's quick start: `make demo` and `make test`.
# Each sets up its own virtual environment first (torch pinned to the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

.PHONY: setup demo bundled-model test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The demo: synthetic corpus -> tokenize -> train a fresh GPT -> generate -> evaluate, all through
# the real Ray jobs on a local Ray, reusing the bundled model's VQGAN (a few minutes on 2 cores).
demo: setup
	$(VENV)/bin/painter demo --output $(OUT)

# How the bundled model (painter/assets/demo-model) was made: the same demo, with VQ training first
# and a longer, gentler GPT run (settings pinned here, not the demo's defaults). About 40 minutes on 2 cores.
BUNDLE_OUT ?= out/bundle
BUNDLE_ARGS ?= --rows 8000 --train-vq-steps 2500 --steps 3000 --workers 2 --batch-size 32 --lr 1e-3 --top-k 4
bundled-model: setup
	$(VENV)/bin/painter demo --output $(BUNDLE_OUT) $(BUNDLE_ARGS)
	rm -rf painter/assets/demo-model && mkdir -p painter/assets/demo-model
	cp $(BUNDLE_OUT)/model/config.json $(BUNDLE_OUT)/model/vocab.txt $(BUNDLE_OUT)/model/*.safetensors painter/assets/demo-model/
	cp $(BUNDLE_OUT)/corpus/_held_out.txt painter/assets/demo-model/held_out_captions.txt

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) out
