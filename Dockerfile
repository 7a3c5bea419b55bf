# One image for the Prefect server, the MLflow server and the Prefect worker (see docker-compose.yml).
# Build: docker compose build   (or: docker build -t embedding-distill:local .)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from the CPU index: from PyPI a looser spec pulls a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app

# The project's dependencies in their own layer (rebuilt only when pyproject.toml changes; torch==2.13.0 is
# already satisfied by the CPU build), plus the `postgres` extra: psycopg2 for MLflow's PostgreSQL store
# (Prefect's asyncpg comes with prefect).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (.dockerignore lets in only what the flow and the deployments need).
COPY . .
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Non-root user; the named volumes mounted on these folders take their owner from the image.
ARG APP_UID=1000
RUN groupadd --gid "${APP_UID}" app \
    && useradd --create-home --uid "${APP_UID}" --gid app --shell /usr/sbin/nologin app \
    && mkdir -p /var/lib/distill /mlartifacts \
    && chown app:app /var/lib/distill /mlartifacts
USER ${APP_UID}:${APP_UID}

# PREFECT_UI_STATIC_DIRECTORY: the Prefect server copies its UI on start, by default into site-packages,
# which this user cannot write (the UI would be missing). DISTILL_PROJECT_DIR: the deployments' working
# directory. No secrets here: credentials come from docker-compose.yml / .env at run time (hadolint's
# DL3064 only sees "TOKEN" in TOKENIZERS_PARALLELISM).
# hadolint ignore=DL3064
ENV PREFECT_UI_STATIC_DIRECTORY=/home/app/.prefect/ui \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DISTILL_PROJECT_DIR=/app \
    DISTILL_WORK_DIR=/var/lib/distill/work \
    HF_HOME=/var/lib/distill/huggingface \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_LOGGING_EXTRA_LOGGERS=tasks,flows

EXPOSE 4200 5000
CMD ["prefect", "worker", "start", "--pool", "distill-cpu", "--type", "process"]
