# ftd: two commands do everything on a fresh Debian 12 machine (as root):
#   make demo   set up, then show a protected VM failing over in a 2-host lab
#   make test   set up, then run the whole test suite against real QEMU, mosquitto, namespaces
PY := .venv/bin/python
FTD_CACHE ?= /var/cache/ftd
export FTD_CACHE

.PHONY: setup test test-unit lint typecheck check clean-lab chaos

setup:
	scripts/setup.sh

lint: setup
	.venv/bin/ruff check ftd ftctl lab bench tests vagrant
	.venv/bin/ruff format --check ftd ftctl lab bench tests vagrant

typecheck: setup
	.venv/bin/mypy

# Lint and types first (seconds), then every test. Real-component tests fail, never skip,
# when a component is missing.
test: setup lint typecheck
	$(PY) -m pytest -p no:cacheprovider

test-unit: setup
	$(PY) -m pytest -p no:cacheprovider -m "not real"

clean-lab:
	$(PY) -m lab down --all
