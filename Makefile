# The two commands of the README: `make demo` and `make test`. Each creates .venv
# when it is missing, installs the pinned toolchain (requirements/pins.txt),
# builds the compiled extension against it, then runs. Re-running is quick:
# nothing is reinstalled or rebuilt unless its inputs changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.pyodlog-deps
BUILD_STAMP := $(VENV)/.pyodlog-build
BROWSER_STAMP := $(VENV)/.pyodlog-browser
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null) setup.py pyproject.toml
export MAX_JOBS ?= 2

.PHONY: all demo test lint bench bench-quick build browser clean distclean

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

# The browser tests (tests/test_viewer_browser.py) drive Debian's chromium through chromedriver.
# Installed with apt-get when missing and possible (root, or passwordless sudo); otherwise those
# tests are skipped with one line saying why, and everything else runs. Never fails the build.
$(BROWSER_STAMP): | $(PY)
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		touch $@; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
		else SUDO=none; fi; \
		if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium and chromium-driver for the browser tests (apt-get)"; \
			if $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq chromium chromium-driver >/dev/null; then touch $@; \
			else echo "pyodlog: apt-get could not install chromium: the browser tests will be skipped"; fi; \
		else \
			echo "pyodlog: chromium and chromedriver are missing and cannot be installed here (needs apt-get and root or sudo): the browser tests will be skipped"; \
		fi; \
	fi

browser: $(BROWSER_STAMP)

demo: $(BUILD_STAMP)
	$(PY) -m pyodlog.demo

test: $(BUILD_STAMP) $(BROWSER_STAMP) lint
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

# The growth curves (issue 17, curves not points): NMS and the writer (benchmarks/scaling.py ->
# scaling.png), the logged call vs batch size and detections per image, and host memory vs logged
# calls (benchmarks/scaling_calls.py -> scaling_calls.png). Its own target, not part of `make bench`:
# the call curves alone took 5-9 minutes on the shared 2-core machine, too much of the 15 minutes
# that `make bench` may take (issue 17).
.PHONY: bench-curves
bench-curves: $(BUILD_STAMP)
	$(PY) -m benchmarks.scaling
	$(PY) -m benchmarks.scaling_calls --profile

clean:
	rm -rf build pyodlog/_C*.so $(BUILD_STAMP)

distclean: clean
	rm -rf $(VENV) *.egg-info
