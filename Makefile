# echod: set-up, run, test, lint, bench, packaging.
# Every target that needs Python sets up the virtual environment first, so each works
# on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
COMPLETION := $(VENV)/share/bash-completion/completions/echod
PYTEST_ARGS ?=

.PHONY: help venv completion run test test-fast test-debian test-trixie lint generate bench mutation deb e2e clean

help:
	@echo "make run        set up, then serve echo in the foreground on the embedded defaults"
	@echo "make test       set up, then run every test (unit, integration, systemd e2e and"
	@echo "                packaging on Debian 12 and 13, both releases' packaged libraries)"
	@echo "make test-fast  unit and integration tests only"
	@echo "make completion bash completion for the virtual environment's echod"
	@echo "make test-debian  the core tests on Debian 12's and 13's packaged libraries"
	@echo "make test-trixie  make test-fast's tests in a Debian 13 tree (python3.13, its libraries)"
	@echo "make lint       ruff and mypy"
	@echo "make generate   regenerate config/echod.yaml, the README tables, echod.yaml(5), echod(8)"
	@echo "make bench      run the benchmark suite; writes docs/bench.md and docs/bench.png"
	@echo "make mutation   mutation testing of the modules that judge input; writes docs/mutation.md"
	@echo "make deb        build dist/echod_<version>_all.deb"

$(STAMP): setup.cfg pyproject.toml bench/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[fast,test,dev,completion]' -r bench/requirements.txt
	touch $@

venv: $(STAMP) $(COMPLETION)

# Generated from the argument parser by argcomplete; for `echod` on PATH (an activated
# virtual environment) and for $(VENV)/bin/echod typed as it is.
$(COMPLETION): $(STAMP)
	mkdir -p $(@D)
	$(VENV)/bin/register-python-argcomplete echod $(VENV)/bin/echod >$@.tmp
	mv $@.tmp $@

completion: $(COMPLETION)
	@echo "bash completion for echod: source $(COMPLETION)"
	@echo "  (add that line to ~/.bashrc to keep it)"

run: $(STAMP)
	$(VENV)/bin/echod run --defaults

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	bash tests/debian-libs.sh

test-debian:
	bash tests/debian-libs.sh

# Debian 13's python3 and packaged libraries only (no virtual environment), under nspawn.
# The fleet tests and promtool need haproxy and prometheus, host tools the tree lacks.
test-trixie:
	bash tests/in-debian.sh --bench trixie /usr/bin/python3 -m pytest -p no:cacheprovider \
		-m "not e2e" --ignore=tests/fleet \
		--deselect tests/integration/test_metrics_http.py::test_promtool_accepts_the_exposition \
		--deselect tests/integration/test_metrics_http.py::test_promtool_catches_a_bad_exposition \
		$(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check echod tests bench
	$(VENV)/bin/mypy

generate: $(STAMP)
	$(PY) -m echod.docgen --write

bench: $(STAMP)
	$(PY) bench/run.py --out docs
	$(PY) bench/acl_proxy.py --json docs/acl_proxy.json > docs/acl_proxy.md

# Niced, two runs at a time: the machine is shared. MUTATION_ARGS narrows it, for example
# MUTATION_ARGS="--module echod/handler.py --sample 5".
MUTATION_ARGS ?=
mutation: $(STAMP)
	nice -n 15 $(PY) tests/mutation/run.py --jobs 2 --out docs/mutation.md $(MUTATION_ARGS)

deb:
	bash packaging/build-deb.sh

e2e: $(STAMP)
	ECHOD_DEB=$$(bash packaging/build-deb.sh) $(PY) -m pytest tests/e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .mutation
