# The two commands of the README:
#   make quickstart   set up, get the data, train the quickstart experiment from scratch into runs/quickstart/
#                     (ignored by git), write its report there, and compare its results with the committed
#                     reference in results/quickstart/: the verdict is "reproduced" or what differs
#   make test         set up, lint (ruff), run the whole test suite and build the documentation (strict)
#   make docs         build the documentation site into site/ (mkdocs build --strict; ignored by git)
# Both reuse what is already done: the environment is installed once, finished runs are skipped. Neither
# changes a tracked file.
VENV ?= .venv
BIN := $(VENV)/bin
QUICKSTART_OUT ?= runs/quickstart

.PHONY: quickstart test lint docs env env-dev data

# Two CPU workers; each run computes with its own train.threads (1 in the spec), so the numbers do not
# depend on the number of workers.
quickstart: env data
	$(BIN)/dynexit run experiments/quickstart.yaml --devices cpu --workers 2 --out $(QUICKSTART_OUT)
	$(BIN)/dynexit report $(QUICKSTART_OUT)
	$(BIN)/dynexit compare $(QUICKSTART_OUT) results/quickstart

# One pytest worker per core (pytest-xdist), each test file on one worker (its module fixtures built once);
# tests/conftest.py splits torch's threads between the workers. The 15 slowest tests are listed at the end,
# so that a suite nearing its 10-minute budget shows where to trim.
# The documentation is built strictly too: a broken link, a missing page or an API name that no longer
# exists fails the build.
test: env-dev lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15 tests
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The spec and command-line references are generated from the code while the site is built
# (scripts/mkdocs_hooks.py); the committed reports' figures are added to it.
docs: env-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The linter first: a style error fails CI before the (long) tests run. Rules: [tool.ruff] in pyproject.toml.
lint: env-dev
	$(BIN)/ruff check dynexit tests benchmarks analysis

env:
	bash scripts/setup_env.sh $(VENV) dev,docs,notebooks

env-dev:
	bash scripts/setup_env.sh $(VENV) dev,docs

data:
	bash scripts/get_data.sh
