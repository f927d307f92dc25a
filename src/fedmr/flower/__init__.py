"""FedMR and its baselines as a Flower app (``pip install fedmr[flower]``).

``server_app.app`` and ``client_app.app`` are the ServerApp and ClientApp that
``flower_app/pyproject.toml`` names; see docs/flower.md.
"""
