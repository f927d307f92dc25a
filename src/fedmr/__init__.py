"""fedmr: Federated Learning via Model Recombination, its baselines, a fast simulator and Flower apps."""

__version__ = "0.1.0"
