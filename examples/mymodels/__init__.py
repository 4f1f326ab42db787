"""A user's own networks, trained by the pipeline through ``model._target_`` (see the README)."""
