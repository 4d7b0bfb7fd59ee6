# The README's two commands: `make demo` and `make test`. Both set up .venv when it is missing.
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.relapse-installed

.PHONY: setup browser demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,nudenet,ray,tensorboard]"
	touch $(STAMP)

# The main job: the demo study (configs/toy.yaml, 2 seeds, its story table last), two steps at a time on a 2-core CPU.
# A rerun resumes it (finished steps are kept); runs/toy/report.html is the result.
demo: setup
	$(VENV)/bin/relapse study configs/toy.yaml --out runs/toy --resume --workers 2

# The report test opens report.html in headless Chromium: Debian's chromium and chromium-driver
# (/usr/bin/chromium, /usr/bin/chromedriver), installed here when missing (with sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo)

browser:
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	  ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver)

# Two test processes of one thread each: the tests' models are too small to split across threads, and two
# processes of two threads on two cores slow each other several-fold (docs/measurements.md).
test: setup browser
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n 2

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
