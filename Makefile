# migrate-job: `make migrate` runs the pipeline (against a local throwaway PostgreSQL when
# DATABASE_URL is unset), `make test` runs the test suite. Both install what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# the lowest supported versions of the dependencies (requirements-lowest.txt)
LOWEST := .venv-lowest
LOCAL  := .local
export PATH := $(CURDIR)/$(BIN):$(PATH)

PG_MAJOR ?= 15

.PHONY: system-deps system-deps-test test-repeat install migrate test test-lowest lint lint-migrations plan revision db-up db-down bench chart image clean

install: $(VENV)/.installed

# System packages, installed with apt-get when missing and we may (root), named otherwise.
# `make migrate` needs only PostgreSQL's server binaries (the throwaway cluster) and its client
# (pg_dump, pg_restore, psql); `make test` adds PgBouncer and openssl (fault tests) and podman with
# runc, catatonit, mmdebstrap and slirp4netns (the image tests).
DB_TOOLS   := initdb=postgresql-$(PG_MAJOR) pg_dump=postgresql-client-$(PG_MAJOR)
TEST_TOOLS := pgbouncer=pgbouncer openssl=openssl podman=podman runc=runc catatonit=catatonit \
              mmdebstrap=mmdebstrap slirp4netns=slirp4netns
define need_tools
	@missing=""; \
	for pair in $(1); do \
		tool=$${pair%%=*}; package=$${pair#*=}; \
		command -v $$tool >/dev/null 2>&1 || [ -x /usr/lib/postgresql/$(PG_MAJOR)/bin/$$tool ] \
			|| [ -x /usr/sbin/$$tool ] || [ -x /usr/libexec/podman/$$tool ] || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$$missing" >&2; \
			apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >&2; \
		else echo "missing system packages:$$missing (install them, e.g. with apt-get)" >&2; exit 1; fi; \
	fi
endef

system-deps:
	$(call need_tools,$(DB_TOOLS))

system-deps-test: system-deps
	$(call need_tools,$(TEST_TOOLS))

# The job and the example's models, for `make migrate` and the other commands that run the job
# (quiet, and on stderr: `make chart` and `make plan` keep stdout for their output)
$(VENV)/.job: pyproject.toml
	@echo "installing the job into $(VENV)" >&2
	@$(PYTHON) -m venv $(VENV) >&2
	@$(BIN)/pip install --quiet --upgrade pip >&2
	@$(BIN)/pip install --quiet -e . >&2
	@touch $@

# Everything the tests need, and a local wheelhouse, so the tests that build the image download
# nothing from PyPI at test time
$(VENV)/.installed: $(VENV)/.job pyproject.toml requirements.txt requirements-app.txt
	@echo "installing the test dependencies into $(VENV)" >&2
	@$(BIN)/pip install --quiet -e '.[app,s3,test]' >&2
	@$(BIN)/pip download --quiet --dest $(LOCAL)/wheels --requirement requirements.txt \
		--requirement requirements-app.txt setuptools >&2
	@touch $@

# DATABASE_URL of the local throwaway cluster, started when DATABASE_URL is not set
DB = $${DATABASE_URL:-$$($(BIN)/python -m tests.pgcluster up $(LOCAL)/pg)}

migrate: system-deps $(VENV)/.job
	@mkdir -p $(LOCAL)/backups
	@url="$(DB)" && DATABASE_URL="$$url" MIGRATE_BACKUP_DIR="$${MIGRATE_BACKUP_DIR:-$(LOCAL)/backups}" \
		$(BIN)/migrate-job run

plan: $(VENV)/.job
	@url="$(DB)" && DATABASE_URL="$$url" $(BIN)/migrate-job plan

test: system-deps-test install
	$(BIN)/pytest -n 2 --dist loadgroup
	@$(MAKE) --no-print-directory test-lowest

# the scenario projects again, against the lowest version of every dependency range
test-lowest: system-deps-test $(LOWEST)/.installed
	$(LOWEST)/bin/pytest -n 2 -p no:cacheprovider tests/test_projects.py

$(LOWEST)/.installed: pyproject.toml requirements-lowest.txt
	@echo "installing the lowest supported versions into $(LOWEST)" >&2
	@$(PYTHON) -m venv $(LOWEST) >&2
	@$(LOWEST)/bin/pip install --quiet --upgrade pip >&2
	@$(LOWEST)/bin/pip install --quiet --requirement requirements-lowest.txt >&2
	@$(LOWEST)/bin/pip install --quiet --no-deps -e . >&2
	@touch $@

# side-by-side measurements against bare Alembic and bare pg_dump (not a test: no pass/fail)
bench: install
	$(BIN)/python bench/bench.py

# the job and app images, with podman or docker (whichever is there):
# make image [TAG=0.1.0] [IMAGE_ARGS="--build-arg PG_CLIENT_SOURCE=debian"]
ENGINE ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
TAG ?= 0.1.0
image:
	@test -n "$(ENGINE)" || { echo "neither podman nor docker is installed" >&2; exit 2; }
	$(ENGINE) build $(IMAGE_ARGS) --tag migrate-job:$(TAG) .
	$(ENGINE) build $(IMAGE_ARGS) --target app --tag migrate-job-blog:$(TAG) .

# squawk over every revision's offline SQL: a pre-deploy gate that needs no database
# the Helm chart rendered offline to stdout (make chart VALUES=my-values.yaml)
chart: install
	@$(BIN)/python deploy/helm/render.py $(VALUES)

lint-migrations: install
	$(BIN)/migrate-job lint --all

lint: install
	$(BIN)/python -m pyflakes job app alembic bench deploy $$(ls tests/*.py | grep -v test_migrations.py)
	$(BIN)/hadolint Dockerfile

# make revision m="add a column"
revision: $(VENV)/.job
	@test -n "$(m)" || { echo 'usage: make revision m="what it does"'; exit 2; }
	@url="$(DB)" && DATABASE_URL="$$url" $(BIN)/alembic revision -m "$(m)"

db-up: $(VENV)/.job
	@$(BIN)/python -m tests.pgcluster up $(LOCAL)/pg

db-down: $(VENV)/.job
	@$(BIN)/python -m tests.pgcluster down $(LOCAL)/pg

clean:
	-$(BIN)/python -m tests.pgcluster down $(LOCAL)/pg
	rm -rf $(LOCAL) $(VENV) $(LOWEST)

# The whole suite as CI runs it, from fresh clones of this checkout's HEAD, N times in a row
# (make test-repeat N=5): each run's exit code and wall time; it stops at the first failure.
N ?= 5
test-repeat:
	@for i in $$(seq $(N)); do \
		dir=$$(mktemp -d) && git clone --quiet "$(CURDIR)" "$$dir/clone" && start=$$(date +%s); \
		( cd "$$dir/clone" && .ci/run ) > "$$dir/log" 2>&1; code=$$?; \
		echo "run $$i of $(N): exit $$code in $$(( $$(date +%s) - start )) s (log: $$dir/log)"; \
		( cd "$$dir/clone" && $(MAKE) --no-print-directory clean ) >/dev/null 2>&1; rm -rf "$$dir/clone"; \
		[ $$code = 0 ] || exit $$code; \
	done
