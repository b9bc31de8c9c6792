"""The ServerApp `flwr run` loads (settings from the run config)."""

from .apps import server_app

app = server_app()
