# Every target installs what it needs: a fresh clone runs `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv test lint train evaluate engines serve clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## The CI command: lint, then the whole pytest suite (CPU only).
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## Retrain both models: 5-fold CV, evaluation, figures, final weights (hours on 2 cores).
train: venv
	$(BIN)/python -m build_engines train --model mobilenet_v2 --pretrained
	$(BIN)/python -m build_engines train --model resnet18
	$(BIN)/python -m build_engines model-card

clean:
	rm -rf $(VENV) .cache
