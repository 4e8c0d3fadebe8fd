"""Estimators and their math: no Prefect, MLflow, Great Expectations or Optuna here."""
