"""The Flower App directory `flwr run` builds into a FAB (see pyproject.toml here)."""
