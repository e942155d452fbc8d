# ftd: two commands do everything on a fresh Debian 12 machine (as root):
#   make demo   set up, then show a protected VM failing over in a 2-host lab
#   make test   set up, then run the whole test suite against real QEMU, mosquitto, namespaces
PY := .venv/bin/python
FTD_CACHE ?= /var/cache/ftd
export FTD_CACHE

.PHONY: setup demo test test-unit lint typecheck clean-lab bench-failover chaos

setup:
	scripts/setup.sh

# The main job on an embedded default: a 2-host lab + broker + witness, a protected VM with
# its disk-writer client, a SIGKILL of the primary QEMU, the failover shown, reprotect.
demo: setup
	$(PY) -m lab.demo

bench-failover: setup
	$(PY) -m bench.failover

# The full chaos campaign (100 seeded rounds on 3 VM hosts, 4 VMs in 2 groups; about an hour
# on 2 cores); make test runs its short variant. CHAOS_ARGS="--rounds N --seed S" to vary.
chaos: setup
	$(PY) -m bench.chaos $(CHAOS_ARGS)

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
