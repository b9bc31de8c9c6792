"""PWFL's benchmark job as a Flower ServerApp and ClientApp."""
