# Two entry points on a fresh clone:  make demo  (set up; extract the shared slides into ./store, caption, train, evaluate)
#                                     make test  (set up, run the whole test suite)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
SLIDES ?= ../shared/data/slides
KATHER ?= ../shared/data/patches/kather2016-samples
STORE  ?= ./store
# Two pytest workers, a test file each at a time (its module fixtures stay in one process), the longest files first
# (tests/conftest.py): most tests wait on servers and subprocesses, so two workers finish the suite on two cores in
# 12 minutes instead of 21.
TEST_WORKERS ?= 2
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A fresh install, measured on two 2-core machines (the second busy): 2.2 and 5.5 minutes, 7.0 GB of .venv (4.4 GB
# of it torch and its CUDA libraries).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "installing pathgen and its dependencies into $(VENV): several minutes and about 7 GB of disk"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# OpenSeadragon, the slide viewer of `pathgen serve`, from its npm package (not copied into the repository); the app
# says how to fetch it when it is missing. Without npm the setup goes on (only the zoomable slide view needs it),
# except in CI ($CI set), where the browser test needs the viewer: there a missing npm fails (.ci/run installs it).
OPENSEADRAGON_VERSION := 6.1.1
OPENSEADRAGON := .vendor/node_modules/openseadragon/build/openseadragon/openseadragon.min.js

$(OPENSEADRAGON):
	@command -v npm >/dev/null || { \
	  if [ -n "$$CI" ]; then echo "CI: npm not found, the slide viewer cannot be fetched; install nodejs and npm (.ci/run does)" >&2; exit 1; fi; \
	  echo "npm not found: pathgen serve will show slides without the zoomable viewer"; exit 0; }; \
	npm install --prefix .vendor --no-save --no-audit --no-fund openseadragon@$(OPENSEADRAGON_VERSION)

setup: $(VENV)/.installed $(OPENSEADRAGON)

demo: setup
	$(BIN)/pathgen run $(SLIDES) --store $(STORE) --dataset $(KATHER) --classes tasks/clip/data/kather2016-classes.json \
		--set clip.batch_size=8 --set clip.stage1.epochs=2
	$(BIN)/pathgen export pathgen-json --store $(STORE) --out $(STORE)/pairs.json
	@echo "pathgen lives in $(VENV): run $(BIN)/pathgen --help, or source $(BIN)/activate first and then pathgen --help"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layers in pyproject.toml: pathgen.cli > flows > tasks > agents > ground floor

test: setup lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: setup
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/select.py
	$(BIN)/python bench/caption.py
	$(BIN)/python bench/plan.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) $(STORE) bench/_work .pytest_cache
