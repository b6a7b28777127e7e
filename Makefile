# Two commands set up everything on a fresh machine:
#   make run    the all-in-one demo site (central on loopback, SQLite)
#   make test   the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test venv clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# compat mode puts the checkout itself on sys.path, so twistd finds the
# twisted/plugins/medd_plugin.py dropin without a copy in site-packages.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/medd demo

# The reading room's browser tests drive Debian's chromium; install it when
# missing and we are root with apt-get, else those tests skip with the reason.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y chromium || { apt-get update && apt-get install -y chromium; } \
			|| echo "chromium not installed: the browser tests will skip"; \
	fi

test: venv chromium
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
