"""Statistics, scores and the report: no torch, no MLflow."""
