# The two commands of the README: `make demo` and `make test`. Each creates .venv
# when it is missing, installs the pinned toolchain (requirements/pins.txt),
# builds the compiled extension against it, then runs. Re-running is quick:
# nothing is reinstalled or rebuilt unless its inputs changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.pyodlog-deps
BUILD_STAMP := $(VENV)/.pyodlog-build
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null) setup.py pyproject.toml
export MAX_JOBS ?= 2

.PHONY: all demo test lint bench bench-quick build clean distclean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements/pins.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements/pins.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	# An editable install, as torchvision and extension-cpp document it: the extension is compiled
	# against the pinned torch of the venv (no build isolation), and `pyodlog` ([project.scripts])
	# lands in .venv/bin.
	$(PY) -m pip install --quiet --no-build-isolation --no-deps --editable .
	$(PY) -c "import pyodlog; print('pyodlog built:', pyodlog.build_info())"
	touch $@

build: $(BUILD_STAMP)

demo: $(BUILD_STAMP)
	$(PY) -m pyodlog.demo

test: $(BUILD_STAMP) lint
	$(PY) -m pytest tests

# ruff (lint and format) over the tree; mypy over the library, the protocol and the collector.
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(BUILD_STAMP)
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' --benchmark-only --benchmark-max-time=0.5 \
		--benchmark-columns=min,median,rounds --benchmark-json=.benchmarks/latest.json -p no:cacheprovider
	$(PY) benchmarks/report.py .benchmarks/latest.json

# The subset to run before every performance claim (a few minutes): the kernels against torchvision,
# the writer against a raw write(), the upload against requests.put, one model's call overhead.
bench-quick: $(BUILD_STAMP)
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks/bench_nms.py benchmarks/bench_postprocess.py benchmarks/bench_writer.py \
		benchmarks/bench_upload.py benchmarks/bench_overhead.py -o python_files='bench_*.py' \
		-k "not cuda and not 20000 and (not overhead or (fasterrcnn and -1-))" \
		--benchmark-only --benchmark-max-time=0.2 --benchmark-columns=min,median,rounds \
		--benchmark-json=.benchmarks/quick.json -p no:cacheprovider
	$(PY) benchmarks/report.py .benchmarks/quick.json

clean:
	rm -rf build pyodlog/_C*.so $(BUILD_STAMP)

distclean: clean
	rm -rf $(VENV) *.egg-info
