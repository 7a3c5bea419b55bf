#!/bin/sh
# Creates MLflow's database beside Prefect's (POSTGRES_DB) in the one PostgreSQL cluster, owned by
# POSTGRES_USER. The postgres image runs /docker-entrypoint-initdb.d/* once, on the first start with an
# empty data volume: changing MLFLOW_DB later needs `docker compose down -v` (which deletes all data) or a
# manual CREATE DATABASE.
# No `set -u` / `exit`: the entrypoint sources this file instead of executing it when the checkout lost the
# executable bit. Creating an existing database is skipped (MLFLOW_DB may equal POSTGRES_DB).
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set mlflow_db="${MLFLOW_DB:-mlflow}" <<'EOSQL'
SELECT format('CREATE DATABASE %I', :'mlflow_db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'mlflow_db')\gexec
EOSQL
