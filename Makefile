# The front door. `make test` and `make lab` work from a fresh clone with Python 3.10+ and gcc:
# they create .venv, install the dev tools, build the kernel, then test or open the book.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
KERNEL := flashdecode/_kernels.pyx
BUILT  := $(VENV)/.built

.PHONY: test lab build export bench annotate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77' 'Cython>=3.0.8'
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $@

# rebuild the extension whenever the exported kernel or the build script changes
$(BUILT): $(STAMP) $(KERNEL) setup.py
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval book --nbval-sanitize-with book/sanitize.cfg -p no:cacheprovider

lab: $(BUILT)
	$(VENV)/bin/jupyter lab --notebook-dir=book

# regenerate flashdecode/*.py and _kernels.pyx from the notebooks, then rebuild
export: $(STAMP)
	$(PY) book/export.py
	$(MAKE) build

# torch is only the comparison: pinned, so pip takes the local CPU wheel (plain `torch` means a multi-GB CUDA build)
BENCH_ARGS ?=
bench: $(BUILT)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m flashdecode.bench $(BENCH_ARGS)

# Cython's annotated HTML: the hot loop should be white (no Python calls)
annotate: $(STAMP)
	$(VENV)/bin/cython -3 -a $(KERNEL) -o build/_kernels_annotated.c
	@echo "open build/_kernels_annotated.html"

clean:
	rm -rf build $(VENV) *.egg-info flashdecode/*.so flashdecode/_kernels.c flashdecode/_kernels.html .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
