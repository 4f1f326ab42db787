"""The only code that imports MLflow: publishing the outputs, live metrics, the UI's views."""
