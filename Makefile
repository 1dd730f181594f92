# The two commands: `make run` trains on Fashion-MNIST end to end, `make test` runs every test.
# Each creates .venv when missing, installs the project into it and makes sure the dataset is there.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATASET := /usr/share/datasets/fashion-mnist
ARGS ?=
PYTEST_ARGS ?=
# Test processes: one per core ("auto"). One process keeps about one core busy (imports, subprocess start-ups,
# Python between small steps), so a second nearly halves the time on two cores.
TEST_WORKERS ?= auto

.PHONY: run test lint dataset bench clean-artifacts

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
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

run: $(STAMP) dataset
	$(VENV)/bin/tapeline run $(ARGS)

test: $(STAMP) dataset
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check stages flows tests benchmarks examples

bench: $(STAMP) dataset
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/time_to_accuracy.py
	$(PY) benchmarks/epoch_gaps.py
	$(PY) benchmarks/multi_worker.py
	$(PY) benchmarks/pipeline_overhead.py
