#!/bin/sh
# Run once by the postgres image on an empty data folder: a second database,
# "optuna", with its own user, beside MLflow's (COMOD_OPTUNA_STORAGE points at it).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v optuna_password="$OPTUNA_PASSWORD" <<'SQL'
CREATE USER optuna WITH PASSWORD :'optuna_password';
CREATE DATABASE optuna OWNER optuna;
SQL
