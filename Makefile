# All set-up lives here: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The web page's browser tests (tests/serve/test_ui.py) drive Debian's Chromium, never a downloaded one.
CHROMIUM := /usr/bin/chromium

.PHONY: install demo test bench bench-serve clean

install: $(STAMP)
	@test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "warning: cannot install Debian's chromium (not root?): the browser tests will fail" >&2

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision are pinned; pip takes them from this machine's local wheels.
	$(PY) -m pip install -q -e '.[train,serve,openvino,ray,dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/captrt demo

test: install
	$(PY) -m pytest -q -x --durations=15

bench: install
	$(PY) benchmarks/run_suite.py

bench-serve: install
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) build *.egg-info
