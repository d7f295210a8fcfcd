# The two commands of the README:
#   make quickstart   set up, get the data, run the quickstart experiment and write its report
#   make test         set up, lint (ruff) and run the whole test suite
# Both reuse what is already done: the environment is installed once, finished runs are skipped.
VENV ?= .venv
BIN := $(VENV)/bin
# The ablation table's budgets (GMACs): inside the cost range of every quickstart curve (the spec's 0.016 is not)
QUICKSTART_BUDGETS := 0.012,0.013,0.015

.PHONY: quickstart test lint env env-dev data

# Two CPU workers of one thread each: tiny models gain little from a second thread.
quickstart: env data
	$(BIN)/dynexit run experiments/quickstart.yaml --devices cpu --workers 2
	$(BIN)/dynexit report results/quickstart --budgets $(QUICKSTART_BUDGETS)

test: env-dev lint
	$(BIN)/python -m pytest -q tests

# The linter first: a style error fails CI before the (long) tests run. Rules: [tool.ruff] in pyproject.toml.
lint: env-dev
	$(BIN)/ruff check dynexit tests benchmarks analysis

env:
	bash scripts/setup_env.sh $(VENV) dev,notebooks

env-dev:
	bash scripts/setup_env.sh $(VENV) dev

data:
	bash scripts/get_data.sh
