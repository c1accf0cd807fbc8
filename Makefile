# charrnn: `make demo` trains a short run and generates text; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel on CPU machines; set TORCH=torch==2.13.0 --index-url ... for a CUDA build.
TORCH  ?= torch==2.13.0
CORPUS ?= $(if $(wildcard ../shared/data/wonderland.txt),../shared/data/wonderland.txt,gutenberg:11)
DEMO_MINUTES ?= 3
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install lock demo test lint bench clean

install: $(VENV)/.installed

# A venv with torch, then this package and its dev extras: $(1) the venv, $(2) pip's extra flags.
define venv_with_deps
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q $(2) "$(TORCH)"
	$(1)/bin/pip install -q $(2) -e '.[dev]'
endef

# constraints.txt pins every package but torch to the versions last tested together.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(call venv_with_deps,$(VENV),-c constraints.txt)
	touch $@

# Re-resolve pyproject.toml's ranges in a scratch venv and pin the result in constraints.txt;
# run `make test` after it, since these are the versions CI will install.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(call venv_with_deps,$(LOCK_VENV),)
	$(LOCK_VENV)/bin/pip freeze --exclude-editable > $(LOCK_VENV)/freeze.txt
	{ sed -n '/^#/p;/^[^#]/q' constraints.txt; grep -iv '^torch==' $(LOCK_VENV)/freeze.txt; } \
		> constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

demo: install
	$(BIN)/python jobs/train.py --config configs/alice.yaml --corpus $(CORPUS) \
		--storage ./runs --name demo --max-minutes $(DEMO_MINUTES)
	$(BIN)/python jobs/generate.py --checkpoint runs/demo/winner.json \
		--prompt "alice was beginning to get very tired" --max-chars 400 --temperature 0.7 --seed 1

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check charrnn jobs tests bench

# Every target's bench, one after another (about 12 minutes on the 2-core machine): the quality run's
# checkpoints then serve the generation and Serve benches. Figures: BENCHMARKS.md.
QUALITY_RUN = $$($(BIN)/python -c 'import json; print(json.load(open("bench/results/train_quality.json"))["run"])')/quality
bench: install
	$(BIN)/python bench/train_quality.py --corpus $(CORPUS)
	$(BIN)/python bench/throughput.py --corpus $(CORPUS)
	$(BIN)/python bench/generation.py --checkpoint $(QUALITY_RUN)/winner.json
	$(BIN)/python bench/step.py --checkpoint $(QUALITY_RUN)/winner.json
	$(BIN)/python bench/ray_overhead.py --corpus $(CORPUS)
	$(BIN)/python bench/data_pipeline.py --corpus $(CORPUS)
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/serve_load.py --run $(QUALITY_RUN)
	$(BIN)/python bench/serve_load.py --run $(QUALITY_RUN) --precision int8 --direct-ingress \
		--throughput-optimized --threads 2

clean:
	rm -rf runs .pytest_cache
