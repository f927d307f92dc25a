"""SCAFFOLD (Karimireddy et al. 2020): control variates estimate each client's drift from the
global update direction; local gradients are corrected by (c - c_i) so clients on non-IID data
walk towards the global optimum rather than their own.

Choices, as the paper's Algorithm 1 with option II:
  * local step: g + c - c_i added to every parameter's gradient before the optimiser step (the
    project's SGD with momentum 0.5 is kept for every method, so the momentum sees the corrected
    gradient);
  * c_i+ = the mean of the client's own (uncorrected) minibatch gradients over its K local steps.
    Under plain SGD this is exactly option II's c_i - c + (x - y_i) / (K * lr).  Under momentum
    beta, (x - y_i) / (K * lr) grows to about 1 / (1 - beta) times that mean (2x at the spec's 0.5),
    so option II's formula over-corrects each client (g + 2(c - c_i) points away from its own data)
    and the run diverges at Dirichlet(0.1); the formula stays available as
    ``variates = "displacement"``;
  * server: x <- x + server_lr * (weighted mean of y_i - x), weighted by sample count as FedAvg
    in this project (equal to the paper's plain mean when clients hold equal data), and
    c <- c + (1 / N) * sum over returned clients of (c_i+ - c_i);
  * variates cover the model's parameters (not BatchNorm statistics), start at zero, and c_i
    persists per client id across rounds; an absent variate means zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..maths import State
from ..training import LocalSettings
from .base import Options, TrainResult, TrainTask, option, prefixed, register_algorithm, unprefixed
from .client_state import ClientStore
from .fedavg import FedAvg


def option_two_variate(client_c: Mapping[str, torch.Tensor], server_c: Mapping[str, torch.Tensor],
                       start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                       steps: int, lr: float) -> State:
    """c_i+ = c_i - c + (x - y_i) / (steps * lr), for every key of ``end``; missing variates are zero."""
    scale = 1.0 / (max(steps, 1) * lr)
    new: State = {}
    for key, y in end.items():
        value = (start[key].to(y.device) - y) * scale
        if key in client_c:
            value = value + client_c[key].to(y.device)
        if key in server_c:
            value = value - server_c[key].to(y.device)
        new[key] = value
    return new


@dataclass(frozen=True)
class ScaffoldOptions(Options):
    server_lr: float = option(1.0, "server step size on the weighted mean update (1 = FedAvg's step)",
                              low=0.0, low_open=True)
    variates: str = option("mean-gradient", "client variate: the mean local gradient (equal to option II under "
                           "plain SGD; stays right under momentum), or option II's (x - y_i) / (K lr) as written",
                           choices=("mean-gradient", "displacement"))


@register_algorithm("scaffold")
class Scaffold(FedAvg):
    description = "FedAvg with server and client control variates that correct each local gradient for client drift"
    reference = ("Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated Learning, "
                 "ICML 2020")
    Options = ScaffoldOptions
    batched_local_step = False  # its own local step (see local_update)
    client_held = ("c_i",)  # the client's own variate, kept by the server for stateless clients

    # ---- server side -------------------------------------------------------------------
    def setup(self, initial_state: State) -> None:
        super().setup(initial_state)
        self.server_c: State = {}  # empty = zero
        self.client_c = ClientStore()

    def configure_train(self, round_idx: int, clients: list[int]) -> list[TrainTask]:
        tasks = []
        for i, c in enumerate(clients):
            payload = {"c": self.server_c, "c_i": self.client_c.get(c, {})}
            tasks.append(TrainTask(c, i, self.global_model, {k: v for k, v in payload.items() if v}))  # zero: omitted
        return tasks

    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        start = self.global_model
        delta_sum: State = {}

        def fold_variates(stream: Iterable[TrainResult]) -> Iterator[TrainResult]:
            for result in stream:
                new_c = result.payload["c_i"]
                old_c = self.client_c.get(result.client_id, {})
                for key, value in new_c.items():
                    delta = value.detach().cpu() - old_c.get(key, 0.0)
                    delta_sum[key] = delta_sum[key] + delta if key in delta_sum else delta
                self.client_c.put(result.client_id, new_c)
                yield result

        used = super().aggregate_train(round_idx, fold_variates(results), rng)
        lr = self.options.server_lr
        if used and lr != 1.0:
            self.global_model = {k: start[k] + lr * (v - start[k]) if v.is_floating_point() else v
                                 for k, v in self.global_model.items()}
        n = self.federation.num_clients
        for key, delta in delta_sum.items():
            self.server_c[key] = self.server_c.get(key, torch.zeros_like(delta)) + delta / n
        return used

    def round_metrics(self) -> dict[str, float]:
        return {"client_state_mb": self.client_c.megabytes()}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {**super().server_state(), **prefixed("c.", self.server_c), **self.client_c.to_tensors("c_i.")}

    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_server_state(tensors)
        self.server_c = {k: v.cpu() for k, v in unprefixed("c.", tensors).items()}
        self.client_c = ClientStore.from_tensors("c_i.", tensors)

    # ---- client side -------------------------------------------------------------------
    def local_update(self, model: nn.Module, task: TrainTask, x: torch.Tensor, y: torch.Tensor,
                     settings: LocalSettings, generator: torch.Generator) -> TrainResult:
        model.load_state_dict(task.state)
        server_c, client_c = task.payload.get("c", {}), task.payload.get("c_i", {})
        params = dict(model.named_parameters())
        correction = {}
        for key, p in params.items():
            if key in server_c or key in client_c:
                c = server_c[key].to(p.device) if key in server_c else torch.zeros_like(p)
                correction[key] = c - client_c[key].to(p.device) if key in client_c else c

        mean_gradient = self.options.variates == "mean-gradient"
        grad_sum = {key: torch.zeros_like(p) for key, p in params.items()} if mean_gradient else {}

        def correct(_: nn.Module) -> None:
            for key, total in grad_sum.items():
                own = params[key].grad
                if own is not None:
                    total.add_(own)  # before the correction: the client's own gradient
            for key, value in correction.items():
                grad = params[key].grad
                if grad is not None:
                    grad.add_(value)

        result, steps = self.sgd_result(model, task, x, y, settings, generator,
                                        after_backward=correct if correction or grad_sum else None)
        if mean_gradient:
            variate = {key: total / max(steps, 1) for key, total in grad_sum.items()}
        else:
            end = {k: p.detach() for k, p in params.items()}
            variate = option_two_variate(client_c, server_c, task.state, end, steps, settings.lr)
        result.payload = {"c_i": variate}
        return result
