# make demo / make test do their own set-up: a .venv in the repo with torch==2.13.0 installed first
# (the CPU wheel), then trainfer in editable mode with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo chat test lint format bench

KERNEL := trainfer/quant/_build/trainfer_native.so

setup: $(STAMP) $(KERNEL)

# The int8 matmul kernel (torch.utils.cpp_extension, the system g++, -march=native): ~20 s once. Without
# it trainfer runs the same math in PyTorch (slower); the test suite checks that it built.
$(KERNEL): trainfer/quant/csrc/kernels.cpp trainfer/quant/csrc/ggml_formats.h $(STAMP)
	$(PY) -m trainfer.quant.native || echo "warning: the native int8 kernel did not build; using the PyTorch fallback"

$(STAMP): pyproject.toml
	@# Debian's redis-server backs the shared response-cache test, Debian's chromium the web page's browser
	@# tests (Playwright drives /usr/bin/chromium: its own browser download cannot work here), Debian's haproxy
	@# the deploy/ tests. Needs root.
	command -v redis-server >/dev/null && command -v chromium >/dev/null && test -x /usr/sbin/haproxy || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium \
	  haproxy >/dev/null; } || echo "warning: install redis-server, chromium and haproxy for their tests"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job: train a small model on the embedded Shakespeare corpus (~5 minutes on 2 cores), validate
# it, run it on the engine, write runs/quickstart/report.md. Then the pre-trained chat model: make chat.
demo: setup
	$(VENV)/bin/trainfer quickstart --out runs/quickstart

# SmolLM2's card recommends temperature 0.2 and top-p 0.9; the seed keeps the answers reproducible.
chat: setup
	$(VENV)/bin/trainfer pull smollm2-135m-instruct
	@for q in "What is the capital of France?" \
	          "Give me three tips for learning to program." \
	          "Write a haiku about the sea."; do \
	  echo; echo ">>> $$q"; \
	  $(VENV)/bin/trainfer chat smollm2-135m-instruct --message "$$q" --temperature 0.2 --top-p 0.9 --seed 0 --max-tokens 128 || exit 1; \
	done

test: setup
	$(PY) -m pytest -q --durations=25  # the slowest tests, to keep the suite under ~20 minutes on 2 cores

lint: setup
	$(VENV)/bin/ruff check trainfer tests benchmarks
	$(VENV)/bin/ruff format --check trainfer tests benchmarks
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format trainfer tests benchmarks
	$(VENV)/bin/ruff check --fix trainfer tests benchmarks

# A quick version of every benchmark (~30-40 minutes on 2 cores; llama.cpp's tools are built from the
# llama-cpp-python sdist on first use), then the summary table at the top of BENCHMARKS.md rewritten.
bench: setup
	$(PY) benchmarks/quick.py
