# The team MLflow server: MLflow's image plus the PostgreSQL driver (backend
# store) and boto3 (the S3 artifact store it proxies).
#   docker build -f cluster/tracking/mlflow.Dockerfile -t REGISTRY/comod-mlflow:3.17.2 cluster/tracking
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
RUN pip install --no-cache-dir psycopg2-binary boto3
