# Quick start: `make run` serves the bundled config; `make test` installs what the tests need
# (Debian packages too, when run as root) and runs lint, types and the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/sentlink.yaml
DEB_PACKAGES := postfix libmilter-dev dovecot-imapd dovecot-pop3d dovecot-lmtpd fetchmail \
                getmail6 swaks miltertest postgresql groff-base

.PHONY: run test lint typecheck unit venv deb bench demo dist clean

$(BIN)/sentlink: pyproject.toml
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s libmilter-dev >/dev/null 2>&1; then $(MAKE) deb; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/sentlink

run: $(BIN)/sentlink
	$(BIN)/sentlink -c $(CONFIG) serve

# Debian packages the real-server tests use. Only as root; otherwise those tests skip with a
# reason (and fail under CI=true).
deb:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "not root: not installing$$missing"; exit 0; fi; \
	  echo "installing$$missing"; \
	  apt-get update -qq && \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: venv
	$(BIN)/ruff check src tests bench demo
	$(BIN)/ruff format --check src tests bench demo

typecheck: venv
	$(BIN)/mypy --strict src

test: deb venv lint typecheck
	$(BIN)/pytest -q -ra

# A private Postfix on loopback wired to sentlink, three sample messages, their Sent copies and
# links; everything it starts is stopped again (root; the system's Postfix is not touched).
demo: deb venv
	$(BIN)/python demo/demo.py

# sdist and wheel in dist/ (building the wheel needs nothing but Python; installing it needs
# libmilter-dev, gcc and the Python headers for pymilter).
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

bench: deb venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
