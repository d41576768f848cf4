# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ivtp demo --out ivtp_out

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) ivtp_out .pytest_cache
