"""The engine that runs rounds: resident data, runners, validation, the simulation loop."""

from .simulator import Experiment, RunOutcome, Simulation, prepare, run_experiment

__all__ = ["Experiment", "RunOutcome", "Simulation", "prepare", "run_experiment"]
