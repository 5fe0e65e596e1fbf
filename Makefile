# Every target installs what it needs: a fresh clone runs `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
ENGINES := $(foreach m,mobilenet_v2 resnet18 mobilenet_v2_int8 resnet18_int8 mobilenet_v2_series resnet18_series,model_repository/$(m)/1/model.onnx)
CONSOLE_URL ?= http://127.0.0.1:5000

.PHONY: venv browser orthanc postgres engines test lint fuzz train serve demo bench loadtest clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

## Debian chromium + chromedriver for the real-browser UI test.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

## Debian Orthanc, the real PACS of the DICOM tests (started by them on free ports, never as a service).
orthanc:
	command -v Orthanc >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq orthanc; }

## Debian PostgreSQL, the console suite's second engine (the tests start a throwaway cluster
## with initdb/pg_ctl on a free port, never the system service).
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq postgresql; }

## ONNX fp32 (parity-checked against PyTorch) and INT8 models, and the series models, from the
## committed weights.
## The *_openvino entries need nothing more: their 1/model.onnx are committed symlinks to these.
engines: $(ENGINES)

$(ENGINES) &: $(STAMP) $(foreach m,mobilenet_v2 resnet18 mobilenet_v2_series resnet18_series,weights/$(m).safetensors)
	$(BIN)/python -m build_engines export
	$(BIN)/python -m build_engines quantize --skip-compare

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## The CI command: lint, then the whole pytest suite (CPU only, real Triton, real chromium, real Orthanc)
## on SQLite, then the console suite again on a real PostgreSQL.
test: venv browser orthanc postgres engines
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	HEMOTRIAGE_TEST_DATABASE=postgresql $(BIN)/python -m pytest tests/console

## Property-based fuzzing of the decoder and POST /api/scans: 10,000 random cases per property.
fuzz: venv
	HEMOTRIAGE_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest tests/console/test_console_fuzz.py

## Retrain both models: 5-fold CV, final weights, the served series rule (nested CV),
## evaluation with figures and the CQ500 check at that rule, MODEL_CARD.md.
train: venv
	$(BIN)/python -m build_engines train --model mobilenet_v2 --pretrained
	$(BIN)/python -m build_engines series --model mobilenet_v2
	$(BIN)/python -m build_engines evaluate --model mobilenet_v2
	$(BIN)/python -m build_engines train --model resnet18 --teacher mobilenet_v2 --keep last
	$(BIN)/python -m build_engines series --model resnet18
	$(BIN)/python -m build_engines evaluate --model resnet18
	$(BIN)/python -m build_engines model-card

## The embedded Triton server alone (HTTP 8000, gRPC 8001, metrics 8002).
serve: venv engines
	$(BIN)/python -m build_engines serve

## The main job: embedded Triton + the triage console (with its DICOM receiver); Ctrl-C stops both.
demo: venv engines
	$(BIN)/python -m console init-db
	@$(BIN)/python -m console create-admin --username admin --if-missing --generate-password
	@trap 'kill $$triton $$console 2>/dev/null; wait' INT TERM EXIT; \
	$(BIN)/python -m build_engines serve & triton=$$!; \
	$(BIN)/gunicorn -c console/gunicorn.conf.py & console=$$!; \
	until $(BIN)/python -c "import urllib.request as u; u.urlopen('$(CONSOLE_URL)/readyz', timeout=2)" 2>/dev/null; do \
	  kill -0 $$triton 2>/dev/null && kill -0 $$console 2>/dev/null || exit 1; sleep 1; done; \
	echo; echo "HemoTriage console ready: $(CONSOLE_URL)"; \
	echo "DICOM receiver: AE title $${HEMOTRIAGE_DICOM_AE_TITLE:-HEMOTRIAGE} on $${HEMOTRIAGE_DICOM_BIND:-127.0.0.1}:$${HEMOTRIAGE_DICOM_PORT-11112} (send CT: $(BIN)/python -m pynetdicom storescu 127.0.0.1 $${HEMOTRIAGE_DICOM_PORT-11112} FILE.dcm -aec $${HEMOTRIAGE_DICOM_AE_TITLE:-HEMOTRIAGE})."; \
	echo "Log in as admin (password printed above on the first run; more users: $(BIN)/python -m console create-user --username NAME --role clinician)."; \
	echo "Ctrl-C stops the console and Triton."; \
	wait $$console

## Benchmarks (measured tables, plots in benchmarks/results/): INT8 and the other CPU variants vs fp32
## (model card), served vs naive,
## time-to-alert, DICOM in and out (C-STORE series, results to Orthanc).
bench: venv orthanc engines
	$(BIN)/python -m build_engines quantize
	$(BIN)/python -m build_engines variants
	$(BIN)/python -m benchmarks.bench_serving
	$(BIN)/python -m benchmarks.bench_time_to_alert
	$(BIN)/python -m benchmarks.bench_dicom

## The 10-minute locust load test with the lost-scan audit (CSV + HTML in benchmarks/results/).
loadtest: venv engines
	$(BIN)/python -m benchmarks.loadtest

clean:
	rm -rf $(VENV) .cache
