"""The engine that runs rounds: the client step, runners, validation, the recorder, the simulation
loop and comparisons (see docs/architecture.md)."""

from .compare import ComparisonOutcome, run_comparison
from .experiment import Experiment, prepare
from .recorder import Recorder
from .simulator import RunOutcome, Simulation, run_experiment

__all__ = ["ComparisonOutcome", "Experiment", "Recorder", "RunOutcome", "Simulation", "prepare", "run_comparison",
           "run_experiment"]
