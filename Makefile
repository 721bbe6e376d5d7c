# The two commands of the README's quick start: `make demo` and `make test`.
# Each sets up its own virtual environment first (torch pinned to the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

.PHONY: setup demo bundled-model bundled-model-guided test test-fast test-compat clean

setup: $(VENV)/.installed

# pip's own output goes to $(VENV)/setup.log, shown only when it fails (a machine's pip configuration can
# print screens of warnings that say nothing about this project)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 > $(VENV)/setup.log 2>&1 || (cat $(VENV)/setup.log; exit 1)
	$(PY) -m pip install -q -e '.[test]' >> $(VENV)/setup.log 2>&1 || (cat $(VENV)/setup.log; exit 1)
	touch $@

# The demo: synthetic corpus -> tokenize -> train a fresh GPT -> generate -> evaluate, all through
# the real Ray jobs on a local Ray, reusing the bundled model's VQGAN (a few minutes on 2 cores).
demo: setup
	$(VENV)/bin/painter demo --output $(OUT)

# How the bundled model (painter/assets/demo-model) was made, in two stages of the same demo with settings
# pinned here (not the demo's defaults). Stage 1 trains the VQGAN (its short GPT run is discarded; the
# VQGAN does not depend on it): about 27 minutes on 2 cores, skipped when its output exists. Stage 2
# trains the GPT over that VQGAN on a larger corpus, longer, with dropout: about 45 minutes.
BUNDLE_OUT ?= out/bundle
BUNDLE_VQ_ARGS ?= --rows 8000 --train-vq-steps 2500 --workers 2 --steps 100
BUNDLE_GPT_ARGS ?= --rows 16000 --steps 6000 --lr 1e-3 --dropout 0.1 --workers 1 --micro-batch 64 --top-k 1
$(BUNDLE_OUT)/vq/vq-model/config.json: | setup
	$(VENV)/bin/painter demo --output $(BUNDLE_OUT)/vq $(BUNDLE_VQ_ARGS)

bundled-model: setup $(BUNDLE_OUT)/vq/vq-model/config.json
	$(VENV)/bin/painter demo --output $(BUNDLE_OUT)/gpt --base-model $(BUNDLE_OUT)/vq/vq-model $(BUNDLE_GPT_ARGS)
	rm -rf painter/assets/demo-model && mkdir -p painter/assets/demo-model
	cp $(BUNDLE_OUT)/gpt/model/config.json $(BUNDLE_OUT)/gpt/model/vocab.txt $(BUNDLE_OUT)/gpt/model/*.safetensors painter/assets/demo-model/
	cp $(BUNDLE_OUT)/gpt/corpus/_held_out.txt painter/assets/demo-model/held_out_captions.txt

# The guidable bundle (classifier-free guidance, issue #12): the bundle's GPT trained again from scratch
# over its VQGAN, as `bundled-model` trains it but with caption dropout (a tenth of the rows see the null
# caption) and 8000 steps instead of 6000, through the demo's jobs (make-corpus, tokenize, train,
# generate, evaluate); the same corpus seed and held-out captions. About an hour on 2 quiet cores.
GUIDED_BASE ?= painter/assets/demo-model
BUNDLE_GUIDED_ARGS ?= --rows 16000 --steps 8000 --lr 1e-3 --dropout 0.1 --null-caption-prob 0.1 --workers 1 --micro-batch 64 --top-k 1
bundled-model-guided: setup
	$(VENV)/bin/painter demo --output $(BUNDLE_OUT)/guided --base-model $(GUIDED_BASE) $(BUNDLE_GUIDED_ARGS)
	cmp $(BUNDLE_OUT)/guided/corpus/_held_out.txt painter/assets/demo-model/held_out_captions.txt
	rm -rf painter/assets/demo-model && mkdir -p painter/assets/demo-model
	cp $(BUNDLE_OUT)/guided/model/config.json $(BUNDLE_OUT)/guided/model/vocab.txt $(BUNDLE_OUT)/guided/model/*.safetensors painter/assets/demo-model/
	cp $(BUNDLE_OUT)/guided/corpus/_held_out.txt painter/assets/demo-model/held_out_captions.txt

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# The compatibility smoke: the OLDEST supported Ray (2.50.0) and torch (2.6.0) in a venv of their own,
# installed offline from a wheelhouse (what it lacks is downloaded into it once), painter with --no-deps;
# then tests/compat/ (tokenize -> train -> generate -> evaluate, `ray job submit`, S3 on moto).
COMPAT_VENV ?= .venv-compat
WHEELHOUSE ?= $(HOME)/.cache/pip/wheelhouse
$(COMPAT_VENV)/.installed: pyproject.toml tests/compat/make_venv.py
	python3 tests/compat/make_venv.py $(COMPAT_VENV) $(WHEELHOUSE)
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/compat

clean:
	rm -rf $(VENV) $(COMPAT_VENV) out
