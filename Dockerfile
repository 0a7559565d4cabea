# syntax=docker/dockerfile:1
# migrate-job: the migration job image (default target), and the example blog service (target `app`).
#
#   docker build -t migrate-job .                                  # the job
#   docker build --build-arg PG_MAJOR=16 -t migrate-job .           # pg_dump must be >= the server's major
#   docker build --build-arg PG_CLIENT_SOURCE=debian -t migrate-job .   # Debian's archive only (pg_dump 15)
#   docker build --target app -t blog .                            # the example FastAPI service
#
# Your own project on top of it:
#
#   FROM migrate-job
#   COPY --chown=10001:10001 alembic.ini /app/alembic.ini
#   COPY --chown=10001:10001 migrations/ /app/migrations/
#   COPY --chown=10001:10001 myapp/ /app/myapp/              # if env.py imports your models
#   RUN ["migrate-job", "manifest"]                           # heads manifest: fast start-ups at head
#   ENV ALEMBIC_CONFIG=/app/alembic.ini

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# --- build: the job installed into a venv ---------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# dependencies in their own layer: they change far less often than the code
COPY requirements.txt ./
RUN pip install --requirement requirements.txt
COPY pyproject.toml README.md ./
COPY job/ job/
RUN pip install --no-deps .

# --- build-app: the same, plus the example service's dependencies ---------------------------
FROM build AS build-app
COPY requirements-app.txt ./
RUN pip install --requirement requirements-app.txt

# --- runtime-base: slim Python, PostgreSQL client tools, an unprivileged user ---------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime-base
ARG DEBIAN_RELEASE
# Where pg_dump comes from. pgdg: the PostgreSQL project's apt repository, any major (PG_MAJOR).
# debian: Debian's own archive only (for builds that reach nothing else: mirrors, air-gapped
# registries), the release's major (15 on bookworm); PG_MAJOR is then not used.
ARG PG_CLIENT_SOURCE=pgdg
# pg_dump refuses to dump a server newer than itself: install the server's major version or newer
ARG PG_MAJOR=18
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PGDG's major version is the pin that matters; PGDG drops old point releases, so exact versions
# would break builds (and Debian's point releases follow the release's security updates).
# hadolint ignore=DL3008
RUN if [ "${PG_CLIENT_SOURCE}" = debian ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends postgresql-client; \
    elif [ "${PG_CLIENT_SOURCE}" = pgdg ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
      && install -d /usr/share/postgresql-common/pgdg \
      && curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc \
           | gpg --dearmor -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.gpg \
      && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.gpg] https://apt.postgresql.org/pub/repos/apt ${DEBIAN_RELEASE}-pgdg main" \
           > /etc/apt/sources.list.d/pgdg.list \
      && apt-get update \
      && apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" \
      && apt-get purge -y --auto-remove curl gnupg; \
    else \
      echo "PG_CLIENT_SOURCE must be pgdg or debian, not '${PG_CLIENT_SOURCE}'" >&2; exit 1; \
    fi \
 && rm -rf /var/lib/apt/lists/* \
 && pg_dump --version
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 -m 0700 /backups
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MIGRATE_BACKUP_DIR=/backups \
    ALEMBIC_CONFIG=/app/alembic.ini
WORKDIR /app
# the example service's migrations and models, so the image runs as is
COPY --chown=10001:10001 alembic.ini ./
COPY --chown=10001:10001 alembic/ alembic/
COPY --chown=10001:10001 app/ app/

# --- app: the example blog service ----------------------------------------------------------
FROM runtime-base AS app
COPY --from=build-app /opt/venv /opt/venv
# /readyz runs the job's check: with the manifest it answers without loading Alembic
RUN python -m compileall -q /opt/venv /app \
 && migrate-job manifest --log-level warning
USER 10001:10001
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]

# --- the job (default target) ---------------------------------------------------------------
FROM runtime-base AS job
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="migrate-job" \
      org.opencontainers.image.description="Alembic migrations for Kubernetes: one runner, a verified backup, exact exit codes, JSON logs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://example.org/migrate-job"
COPY --from=build /opt/venv /opt/venv
# compiled now, so that a read-only root filesystem costs nothing at start-up
RUN python -m compileall -q /opt/venv /app \
 && migrate-job manifest --log-level warning
USER 10001:10001
VOLUME ["/backups"]
ENTRYPOINT ["migrate-job"]
CMD ["run"]
