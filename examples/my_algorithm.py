"""Your own algorithm, compared against FedMR on the same engine, data, partition and initial model.

    python examples/my_algorithm.py

FedAvgM (Hsu et al. 2019): FedAvg with server momentum.  From the command line:

    PYTHONPATH=examples fedmr compare --algorithms fedmr,my_algorithm:FedAvgM@beta=0.5 --set num_clients=20 ...
"""

import os
from dataclasses import dataclass

import fedmr
from fedmr.maths import RunningMean


@dataclass(frozen=True)
class FedAvgMOptions(fedmr.Options):  # the config section ["my_algorithm:FedAvgM"] holds these
    beta: float = fedmr.option(0.7, "server momentum", low=0.0, high=1.0, high_open=True)


class FedAvgM(fedmr.Algorithm):
    """The server moves along a momentum of the clients' mean update."""

    name = "fedavgm"
    Options = FedAvgMOptions

    def setup(self, initial_state):
        self.model = {k: v.clone() for k, v in initial_state.items()}
        self.velocity = {k: v.new_zeros(v.shape, dtype=v.dtype) for k, v in self.model.items()}

    def configure_train(self, round_idx, clients):
        return [fedmr.TrainTask(client, slot, self.model) for slot, client in enumerate(clients)]

    def aggregate_train(self, round_idx, results, rng):
        mean, used = RunningMean(), 0
        for result in results:
            mean.add(result.state, float(result.num_samples))
            used += 1
        if used:
            for key, average in mean.result().items():
                self.velocity[key] = self.options.beta * self.velocity[key] + (self.model[key] - average.to(self.model[key]))
                self.model[key] = self.model[key] - self.velocity[key]
        return used

    def global_state(self):
        return self.model

    def server_state(self):
        return {**{f"model.{k}": v for k, v in self.model.items()}, **{f"velocity.{k}": v for k, v in self.velocity.items()}}

    def load_server_state(self, tensors):
        self.model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.velocity = {k[9:]: v for k, v in tensors.items() if k.startswith("velocity.")}


if __name__ == "__main__":
    config = {"num_clients": 20, "clients_per_round": 5, "rounds": int(os.environ.get("FEDMR_EXAMPLE_ROUNDS", 30)),
              "eval_every": 5, "alpha": 1.0, "lr": 0.05}  # the embedded digits data set
    results = fedmr.compare(config, ["fedmr", FedAvgM, "__main__:FedAvgM@beta=0.3"])
    for name, result in results.items():
        print(f"{name}: final accuracy {result.summary['final_accuracy']:.3f}")
