"""The training core: data, batches, models, the loop, noise scale, checkpoints. torch; never MLflow."""
