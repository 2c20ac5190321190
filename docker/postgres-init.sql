-- One PostgreSQL server, two databases: MLflow's tracking store and Optuna's study storage.
-- Runs once, when the data volume is first initialised (docker-entrypoint-initdb.d).
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
