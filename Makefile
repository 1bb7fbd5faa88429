# Two commands do all set-up on a fresh machine:
#   make main   the equal-FLOPs router comparison on Tiny Shakespeare (results table + plots)
#   make test   the test suite, notebooks included (two pytest-xdist workers)
#   make notebooks   JupyterLab on notebooks/ (installs the `notebooks` extra)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
RUNS ?= runs/compare_routers

.PHONY: main test install notebooks

$(STAMP): setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

main: $(STAMP)
	$(VENV)/bin/moe-jax sweep --config configs/compare_routers.py --workdir $(RUNS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist worksteal

notebooks: $(STAMP)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[notebooks]'
	$(VENV)/bin/jupyter lab notebooks/
