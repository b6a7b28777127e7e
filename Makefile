# Two commands set up everything on a fresh machine:
#   make run    the all-in-one demo site (central + viewer on loopback, SQLite)
#   make test   the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test venv clean test-tools ohif

# OHIF Viewer 3's prebuilt app (the reading room's image viewer), from the npm
# registry at the version and integrity pinned in ohif/package-lock.json.
OHIF_DIST = ohif/node_modules/@ohif/app/dist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# compat mode puts the checkout itself on sys.path, so twistd finds the
# twisted/plugins/medd_plugin.py dropin without a copy in site-packages.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

$(OHIF_DIST)/index.html: ohif/package.json ohif/package-lock.json
	@command -v npm >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q nodejs npm || \
		  { apt-get update -q && apt-get install -y -q nodejs npm; }; }; } \
		|| { echo "npm is missing: apt-get install nodejs npm"; exit 1; }
	npm ci --prefix ohif --ignore-scripts --no-audit --no-fund
	touch $@

ohif: $(OHIF_DIST)/index.html

run: venv ohif
	$(BIN)/medd demo

# System tools some tests drive: Debian's chromium (the reading room's browser
# tests), DCMTK's storescu (a modality-grade SCU), npm (for `make ohif`), rsyslog, systemd-analyze (the
# service unit's check), strace and PostgreSQL's server binaries (the fault campaign), and postfix +
# dovecot (the e-mail transport's tests start their own instances; postfix is installed with
# "No configuration", so no system mail server is set up). Installed when missing and
# we are root with apt-get; otherwise those tests skip with the reason.
test-tools:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v storescu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
	[ -x /usr/sbin/rsyslogd ] || missing="$$missing rsyslog"; \
	ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1 || missing="$$missing rsyslog-gnutls"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/sbin/postfix ] || missing="$$missing postfix"; \
	[ -x /usr/lib/dovecot/imap ] || missing="$$missing dovecot-imapd"; \
	[ -x /usr/lib/dovecot/lmtp ] || missing="$$missing dovecot-lmtpd"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null; \
		apt-get install -y -q $$missing || { apt-get update -q && apt-get install -y -q $$missing; } \
			|| echo "could not install$$missing: the tests that need them will skip"; \
	fi

test: venv test-tools ohif
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache ohif/node_modules
