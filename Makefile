# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests and the demo never reach a model hub, and run against a local Ray with auth off.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint lock clean

install: $(STAMP)

# torch first, alone: it comes as the 2.13.0 CPU wheel; everything else is resolved against constraints.txt
# (the exact versions tested on the CPU machines). facenet-pytorch's pins are stale: only its MTCNN weight
# files are used, so it goes in without its dependencies.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt -e ".[all]"
	$(PY) -m pip install --quiet --no-deps -c constraints.txt facenet-pytorch
	touch $(STAMP)

demo: install
	$(PY) scripts/demo.py --out demo_output

test: install
	$(PY) -m pytest -q tests

# ruff: lint rules, import order and formatting (settings in pyproject.toml). CI runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Re-record constraints.txt from the current environment (after changing pyproject.toml).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(multitalk-platform|-e )' > constraints.txt

clean:
	rm -rf $(VENV) demo_output .pytest_cache
