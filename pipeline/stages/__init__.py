"""The DVC stages: each reads files, runs the core, writes files, then has its outputs published."""
