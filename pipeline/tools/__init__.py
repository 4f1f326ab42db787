"""Tools beside the pipeline: bench, find-batch-size, reproduce, the MLproject launcher."""
