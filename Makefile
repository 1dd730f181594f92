# The two commands: `make run` trains on Fashion-MNIST end to end, `make test` runs every test.
# Each creates .venv when missing, installs the project into it and makes sure the dataset is there: `make run` the
# package and its runtime dependencies only (the CPU build of TensorFlow), `make test` the development tools too.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-stamp
STAMP := $(VENV)/.installed-stamp
DATASET := /usr/share/datasets/fashion-mnist
ARGS ?=
PYTEST_ARGS ?=
# Test processes: one per core ("auto"). One process keeps about one core busy (imports, subprocess start-ups,
# Python between small steps), so a second nearly halves the time on two cores.
TEST_WORKERS ?= auto

.PHONY: run test test-fast lint docs dataset bench clean-artifacts

$(RUNTIME): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu]'
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

dataset:
	@if [ -d "$(DATASET)" ] || [ -n "$$TAPELINE_DATA_DIR" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is not installed at $(DATASET)."; \
		echo "  Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist"; \
		echo "  elsewhere: put the four IDX files in \$$TAPELINE_DATA_DIR/fashion_mnist/, or stay online and"; \
		echo "  tapeline downloads them through tf.keras.datasets."; \
	fi

run: $(RUNTIME) dataset
	$(VENV)/bin/tapeline run $(ARGS)

test: $(STAMP) dataset
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The tier to run before each commit: unit tests of every stage and engine module; no server, no subprocess run.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

# The manual: docs/ built by MkDocs (Material) into site/, strictly (a broken link or a stale generated page fails).
docs: $(STAMP)
	$(PY) -m tapeline.reference --check docs/configuration.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VENV)/bin/ruff check tapeline stages sweeps flows tests benchmarks examples

bench: $(STAMP) dataset
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.time_to_accuracy
	$(PY) -m benchmarks.epoch_gaps
	$(PY) -m benchmarks.multi_worker
	$(PY) -m benchmarks.pipeline_overhead
