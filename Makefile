# The front door. `make test` and `make lab` work from a fresh clone with Python 3.10+ and gcc:
# they create .venv, install the dev tools, build the kernel, then test or open the book.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
KERNEL := flashdecode/_kernels.pyx $(wildcard flashdecode/*.h)
BUILT  := $(VENV)/.built

.PHONY: test lint lab build export run figures bench annotate book dist clean

# hf: torch (pinned: the local CPU wheel) and transformers, for chapter 10 and tests/test_hf.py
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 'setuptools>=77' 'Cython>=3.0.8'
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev,hf]'
	touch $@

# rebuild the extension whenever the exported kernel or the build script changes
$(BUILT): $(STAMP) $(KERNEL) setup.py
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(BUILT)

# style: ruff (pinned in the dev extra, configured in pyproject.toml), check and format; both always run, so one
# look shows everything. The notebooks are linted as they are (ruff reads .ipynb), the generated modules too.
LINTED := flashdecode tests book/*.py book/*.ipynb setup.py site/conf.py
lint: $(STAMP)
	@status=0; \
	$(VENV)/bin/ruff check $(LINTED) || status=1; \
	$(VENV)/bin/ruff format --check $(LINTED) || status=1; \
	exit $$status

# lint first: a style slip fails in seconds, not after the suite
# -rs prints every skip's reason: the browser test says why it did not run (no /usr/bin/chromium)
test: lint $(BUILT)
	$(PY) -m pytest tests -rs
	$(PY) -m pytest --nbval book --nbval-sanitize-with book/sanitize.cfg -p no:cacheprovider

# root (containers, CI machines) needs --allow-root; nobody else gets it
lab: $(BUILT)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=book $(if $(filter 0,$(shell id -u)),--allow-root)

# regenerate flashdecode/*.py and _kernels.pyx from the notebooks, then rebuild
export: $(STAMP)
	$(PY) book/export.py
	$(MAKE) build

# re-run one chapter and store its outputs, e.g. make run NB=book/03_tiling.ipynb
run: $(BUILT)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False \
		--ExecutePreprocessor.store_widget_state=False $(NB)
	$(PY) book/export.py --clean

# the static frames the README shows (the notebooks store their own): the explorer's trace at the tiles where
# something happens (SoftmaxTrace.events: first, largest rescale, halfway, last)
figures: $(BUILT)
	$(PY) -c "from flashdecode.trace import SoftmaxTrace, random_scores; \
	from flashdecode.viz import explorer_frames, figure_png; \
	open('book/figures/softmax_explorer_frames.png', 'wb').write(figure_png(explorer_frames( \
	SoftmaxTrace(*random_scores(1000, spread=3.0, seed=0), tile_size=64)), colours=128))"

# the book as a website in build/html (open build/html/index.html): Sphinx + myst-nb render the notebooks' stored
# outputs (nothing is executed), MathJax is served from the site itself, warnings are errors. The API page imports
# the built package (autodoc), hence $(BUILT). Always from scratch, so a renamed chapter leaves no stale page.
book: $(BUILT)
	rm -rf build/html build/doctrees build/jupyter_execute
	$(PY) -m sphinx -W --keep-going -b html -q -d build/doctrees site build/html
	@echo "the site: build/html/index.html"

# the sdist and a wheel built from it (in an isolated build environment) into dist/
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .

# torch is only the comparison: pinned, so pip takes the local CPU wheel (plain `torch` means a multi-GB CUDA build)
BENCH_ARGS ?=
bench: $(BUILT)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m flashdecode.bench_report $(BENCH_ARGS)

# Cython's annotated HTML: the hot loop should be white (no Python calls)
annotate: $(STAMP)
	$(VENV)/bin/cython -3 -a -I flashdecode flashdecode/_kernels.pyx -o build/_kernels_annotated.c
	@echo "open build/_kernels_annotated.html"

clean:
	rm -rf build dist $(VENV) *.egg-info flashdecode/*.so flashdecode/_kernels.c flashdecode/_kernels.html .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
