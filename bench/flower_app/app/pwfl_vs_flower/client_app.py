"""The ClientApp `flwr run` loads (settings from the run config)."""

from .apps import client_app

app = client_app()
