# The two commands of the README: `make run` and `make test`. Both create or
# refresh .venv first (again whenever pyproject.toml changes).
VENV ?= .venv
STAMP := $(VENV)/.passk-installed

.PHONY: run test setup bench
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-venv.sh
	scripts/setup-venv.sh $(VENV)
	@touch $@

# The main job. For now: the advantage-curve report (Figures 9 and 18).
run: setup
	$(VENV)/bin/passk advantage-curves --n 32 --k 1 4 8 --out runs/advantage-curves

test: setup
	$(VENV)/bin/ruff check services bench tests
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python bench/advantage.py
