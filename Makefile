# Two commands on a fresh machine: `make run` (main job) and `make test` (test suite).
# Both create .venv and install the project with torch pinned to the CPU build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: run test lint bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q -c constraints.txt -e examples/m3tfed-example-plugin
	# Headless Chromium for the report.html test (a system package, Debian's `chromium`).
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/m3tfed run

# Two workers (pytest-xdist), one per core: most tests run on one thread. Each test file
# stays on one worker (--dist loadfile), so a module's shared fixture (the Flower
# deployment, DeepSpeed's trained ranks) is built once; the bench smoke runs are spread
# over both (tests/conftest.py: SPLIT_FILES).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check core plugins experts tests bench examples

# Benchmarks need the optional DeepSpeed and Flower baselines.
bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	DS_ACCELERATOR=cpu $(BIN)/python bench/moe_layer.py
	$(BIN)/python bench/round_overhead.py
	$(BIN)/python bench/communication.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/secagg.py
	$(BIN)/python bench/dp_sgd.py
	$(BIN)/python bench/text_encoder.py
	$(BIN)/python bench/flower_backend.py
	$(BIN)/python bench/privacy_audit.py
	$(BIN)/python bench/unlearning.py
	$(BIN)/python bench/threads.py

clean:
	rm -rf $(VENV) .cache
