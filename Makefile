# The two commands of the README: `make run` and `make test`. Each sets up on its own.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export GIT_PYTHON_REFRESH := quiet

.PHONY: setup run test test-fast bench ui server clean

HOST ?= 127.0.0.1
PORT ?= 5000

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-ray.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: setup
	@test -d .git || { git init -q && git add -A && git -c user.name=batchlab -c user.email=batchlab@localhost commit -qm "initial"; }
	@# DVC ends every repro that ran a stage with "Use `dvc push`", remote or not: that line goes.
	@echo dvc repro; set -o pipefail; dvc repro 2>&1 | grep --line-buffered -v '^Use `dvc push` to send your'
	@# DVC may have restored outputs from its cache without running a stage: publish what the store lacks.
	$(PY) -m pipeline sync
	@echo
	@echo "Results:  outputs/compare/report.html (the sweep report), dvc metrics show, dvc plots show"
	@echo "Runs:     $${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow.db)}, experiment 'batchlab'"
	@echo "Look:     make ui, then open"
	@echo "          $$($(PY) -m pipeline ui-url --base http://127.0.0.1:$(PORT) 2>/dev/null)"

test: setup
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15 tests

# The edit-test loop: everything but the end-to-end tests marked slow (real dvc / mlflow run /
# servers / subprocess training).
test-fast: setup
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

bench: setup
	$(PY) -m pipeline bench

BACKEND ?= sqlite:///$(abspath mlflow-server.db)
server: setup
	mlflow server --host $(HOST) --port $(PORT) --backend-store-uri $(BACKEND) \
		--artifacts-destination $(abspath mlartifacts-server) --serve-artifacts

ui: setup
	mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(abspath mlflow.db)} --host 127.0.0.1 --port $(PORT)

# The outputs only: the MLflow store (mlflow.db, mlartifacts) and DVC's cache stay, so the next
# `make run` restores the outputs of runs the store already holds and both still agree. To start
# over, remove mlflow.db, mlartifacts and .dvc/cache as well, then `dvc repro --force`.
clean:
	rm -rf outputs data/prepared checkpoints .batchlab.lock dvc_plots
