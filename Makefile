# The two commands a newcomer runs:  make demo   and   make test
# Each creates .venv on first use. On a machine without torch it installs TORCH (the CPU build
# torch==2.13.0 on these machines); a machine that already has torch (Colab, a GPU box) keeps it.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
MODEL  ?= toyworld
JOBS   ?= 2
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test clean-venv

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dreambooth_lab demo --model $(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
