# Batch image service. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
POSTGRES_TEST_URL ?= postgresql+psycopg2://postgres@127.0.0.1:5432/test

.DEFAULT_GOAL := help
.PHONY: help install install-dev run worker migrate test test-postgres test-all lint format bench postman mutate clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's|$$(POSTGRES_TEST_URL)|$(POSTGRES_TEST_URL)|g' \
		| awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.runtime-installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

install: $(VENV)/.runtime-installed ## Create .venv with the pinned runtime dependencies (quick when up to date)

install-dev: $(VENV)/.dev-installed ## Add the test and lint tools

run: install ## Apply migrations and serve on HOST:PORT (settings from the environment or .env)
	$(PY) -m app

worker: install ## Start a Celery worker (TASK_BACKEND=celery; same settings as `make run`; run several per host)
	$(PY) -m app.runners

migrate: install ## Apply Alembic migrations to DATABASE_URL
	$(PY) -m alembic upgrade head

test: install-dev ## Run the test suite (SQLite; set TEST_DATABASE_URL for another database)
	$(PY) -m pytest $(PYTEST_ARGS)

test-postgres: install-dev ## Run the test suite on PostgreSQL ($(POSTGRES_TEST_URL))
	TEST_DATABASE_URL=$(POSTGRES_TEST_URL) $(PY) -m pytest $(PYTEST_ARGS)

test-all: test test-postgres ## Both databases

lint: install-dev ## ruff lint and format check
	$(PY) -m ruff check app tests bench alembic
	$(PY) -m ruff format --check app tests bench alembic

format: install-dev ## Apply ruff fixes and formatting
	$(PY) -m ruff check --fix app tests bench alembic
	$(PY) -m ruff format app tests bench alembic

bench: install-dev ## Benchmark the service against local servers; prints a table, saves JSON
	$(PY) -m bench $(BENCH_ARGS)

postman: install ## Run docs/postman's collection with newman (pinned, into .ci/node) against the service
	PY=$(PY) bash tests/postman/run.sh

# What `make mutate` mutates, by function (docs/mutation.md): the network guard and URL
# grammar, the ledger, idempotency, the ownership filters of the results, webhook signing
# and retry scheduling (not the HTTP transport), the memory budget.
MUTANTS ?= app.net.* app.ledger.* app.services.idempotency.* \
	app.services.results.x_get_request__* app.services.results.x_requests_page__* \
	app.webhooks.signing.* app.webhooks.events.* app.webhooks.delivery.x_parse_retry_after__* \
	$(foreach f,backoff due_event_ids seconds_until_next_due attempt _record_attempt _after_unrecorded_attempt _send,app.webhooks.delivery.x?WebhookDeliverer?$(f)__*) \
	app.pipeline.memory.*

# Mutants at once: a mutant's tests wait on local servers and threads about half the time
# (one pytest of the selection: 21 s of CPU in 45 s), so 4 keep the 2 cores busy.
MUTATE_CHILDREN ?= 4

mutate: install-dev ## Mutation testing of the guards, ledger, idempotency and webhooks (not in CI; MUTANTS='app.ledger.*' for some)
	rm -rf mutants
	nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(foreach m,$(MUTANTS),'$(m)')
	@$(VENV)/bin/mutmut export-cicd-stats >/dev/null
	@$(PY) -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
	k = s['killed'] + s['timeout']; n = k + s['survived'] + s['no_tests'] + s['suspicious'] + s['segfault']; \
	print(f'mutation score: {k} killed of {n} ({100 * k / max(n, 1):.0f}%)')"

clean: ## Remove the venv, caches, the default SQLite database and processed images
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis data
	find processed_images -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
