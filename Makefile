# Two entry points for a fresh clone: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo board test lint venv benchmark clean

venv: $(STAMP)

# torch/torchvision pins first: they install from the local wheel cache, so no multi-GB download happens.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --logdir runs

# TensorBoard on the demo's runs (127.0.0.1 only), keeping every logged epoch's images
board: $(STAMP)
	$(VENV)/bin/lightning-viz board runs/

lint: $(STAMP)
	$(PY) -m ruff check lightning_viz tests examples benchmarks docs
	$(PY) -m ruff format --check lightning_viz tests examples benchmarks docs

# pytest exits 5 when it collected nothing: say so, and fail.
test: lint
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

benchmark: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs lightning_logs
