"""batchlab: batch-size experiments with PyTorch, tracked in MLflow, driven by DVC (see README.md)."""
