# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-serve env clean

# The environment is built once and rebuilt when pyproject.toml changes.
# torch/torchvision come from pip (never uv/poetry): on the project's machines pip takes them from disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	$(BIN)/invmon run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py $(ARGS)

# The local endpoint at 1/4/16 clients against the same model's raw forward rate, same run.
bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve_throughput.py $(ARGS)

clean:
	rm -rf .invmon build
