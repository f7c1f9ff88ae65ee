# Two entry points (see README): `make demo` renders a video with the embedded model, `make test` runs the checks
# and the tests (what CI runs: .ci/run). Both create .venv and install what they need; no model weights are ever
# downloaded. `make test-fast`: the in-process tests only, for the inner loop.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines: the torch 2.13.0 CPU wheel lies on this machine's disk; an unpinned torch would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# the page test (tests/test_page.py) drives Debian's headless Chromium through selenium; CI (root, Debian) installs
# it here. Elsewhere a failed install only skips that test (under CI=true it fails instead).
BROWSER := /usr/bin/chromedriver
$(BROWSER):
	-command -v apt-get >/dev/null && apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

install: $(STAMP) $(BROWSER)

demo: $(STAMP)
	mkdir -p outputs
	$(PY) launch/generate.py --prompt "a red circle moving right quickly on a dark background" \
		--fis balanced --output outputs/demo.mp4
	# the same video without FIS, to compare (docs/benchmarks.md: how far FIS moves this small model), and with the
	# quality preset (operator attn: no speckle on this model, docs/eval/operators/eval.md)
	$(PY) launch/generate.py --prompt "a red circle moving right quickly on a dark background" \
		--fis off --output outputs/demo-dense.mp4
	$(PY) launch/generate.py --prompt "a red circle moving right quickly on a dark background" \
		--fis quality --output outputs/demo-quality.mp4

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test: lint $(BROWSER)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

.PHONY: install demo lint test test-fast
