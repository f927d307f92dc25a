"""FedGen (Zhu, Hong and Zhou 2021): data-free knowledge distillation.  The server learns a
conditional generator G(y, eps) -> z in the models' representation space (the input of the
classifier head) such that the clients' heads, weighted by how much of label y each client
holds, classify z as y; the generator travels with the global model, and every local step adds
two regularisers built from it: the head must classify generated z (alpha) and the model's
prediction on real x must match its own head's prediction on G(y) for the batch's labels (beta).

Sizes and weights are the official code's defaults for its MNIST setting (``utils/model_config.py``
of github.com/zhuangdizhu/FedGen; the paper gives no per-dataset table and the FedMR spec lists
none): generator = Linear(noise + one-hot labels -> 256), BatchNorm, ReLU, Linear(-> head input
size); noise 32-dim uniform on [0, 1) as the code draws it; 50 Adam steps a round (10 "epochs" of
5 teacher iterations) on batches of 32, lr 3e-4, weight decay 1e-2, lr x 0.98 per round; loss =
teacher loss + 1 * diversity loss, the teacher loss being sum over the round's clients k of
mean_i(w_k,y_i * CE(head_k(z_i), y_i)), w_k,y = client k's share of label y among them (the code
multiplies a (batch, 1) weight by a (batch,) loss, which broadcasts to the product of the two
means; the per-sample weighting here is what it intends), labels drawn uniformly from those some
client holds more than one sample of; client weights alpha = beta = 10, each x 0.98 per
round with a floor of 1e-4; the alpha term scaled by gen_batch_size / batch_size (32 / local batch
size), as in the code.  The regularisers start once the generator has been trained (round 1 on),
as the code's ``regularization = glob_iter > 0``.  The CIFAR entry of the official code
(hidden 512, noise 64) is available as ``fedgen.hidden_dim`` / ``fedgen.noise_dim``.

The head is the model's last linear layer (its last weight of shape (classes, D) and bias), which
holds for every model of :mod:`fedmr.models`; the server keeps only the heads of the round's
clients, not their whole models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..maths import State
from ..seeding import derive_seed
from ..training import LocalSettings, LossFn, cross_entropy
from .base import Federation, Options, TrainResult, TrainTask, option, prefixed, register_algorithm, unprefixed
from .fedavg import FedAvg

if TYPE_CHECKING:
    from ..models import FLModel

MIN_SAMPLES_PER_LABEL = 1  # a label trains the generator only if some client holds more than this


class Generator(nn.Module):
    """G(y, eps): [eps, one_hot(y)] -> hidden (BatchNorm, ReLU) -> representation."""

    def __init__(self, num_classes: int, representation_dim: int, hidden_dim: int = 256, noise_dim: int = 32):
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.hidden = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
        self.out = nn.Linear(hidden_dim, representation_dim)

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        device = self.out.weight.device
        return torch.rand(n, self.noise_dim, generator=generator, device=generator.device).to(device)

    def forward(self, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(labels, self.num_classes).to(eps.dtype)
        return self.out(self.hidden(torch.cat([eps, one_hot], dim=1)))


def diversity_loss(eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """exp(-mean(d_noise * d_out)) over all pairs: low when different noises give different outputs."""
    out_dist = (z[None, :, :] - z[:, None, :]).abs().mean(dim=2)
    noise_dist = (eps[None, :, :] - eps[:, None, :]).pow(2).mean(dim=2)
    return torch.exp(-(noise_dist * out_dist).mean())


def head_keys(state: Mapping[str, torch.Tensor], num_classes: int) -> tuple[str, str]:
    """Keys of the classifier head: the state's last weight of shape (classes, D) and its bias."""
    keys = list(state)
    if len(keys) < 2:
        raise ConfigError("fedgen needs a model whose last layer is a linear classifier")
    weight, bias = keys[-2], keys[-1]
    w, b = state[weight], state[bias]
    if w.dim() != 2 or w.shape[0] != num_classes or b.shape != (num_classes,):
        raise ConfigError("fedgen needs a model whose last layer is a linear classifier "
                          f"(found '{weight}' {tuple(w.shape)}, '{bias}' {tuple(b.shape)})")
    return weight, bias


def label_weights(counts: np.ndarray) -> np.ndarray:
    """(clients, classes) counts -> per label, each client's share of that label among them."""
    totals = counts.sum(axis=0, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)


def decayed(value: float, decay: float, round_idx: int) -> float:
    """The official schedule of the regulariser weights: value * decay^round, at least 1e-4 (0 stays off)."""
    return max(1e-4, value * decay**round_idx) if value > 0 else 0.0


def fedgen_loss(generator: Generator, mu_teacher: float, mu_latent: float, gen_batch_size: int, batch_size: int,
                num_classes: int, rng: torch.Generator) -> LossFn:
    """Cross-entropy on real data + FedGen's two generator regularisers."""
    ratio = gen_batch_size / batch_size

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        net = cast("FLModel", model)  # every model has features and head (models.py); typed for them
        with torch.no_grad():
            target = F.softmax(net.head(generator(y, generator.noise(y.shape[0], rng))), dim=1)
            sampled = torch.randint(num_classes, (gen_batch_size,), generator=rng, device=rng.device).to(y.device)
            z = generator(sampled, generator.noise(gen_batch_size, rng))
        latent = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
        teacher = F.cross_entropy(net.head(z), sampled)
        return loss + ratio * mu_teacher * teacher + mu_latent * latent

    return loss_fn


@dataclass(frozen=True)
class FedGenOptions(Options):
    hidden_dim: int = option(256, "width of the generator's hidden layer (the official CIFAR setting: 512)", low=1)
    noise_dim: int = option(32, "size of the generator's noise input (the official CIFAR setting: 64)", low=1)
    gen_batch_size: int = option(32, "generated samples per generator step and per local regulariser batch", low=1)
    generator_steps: int = option(50, "Adam steps of the generator per round (0 = never trained)", low=0)
    generator_lr: float = option(3e-4, "the generator's Adam learning rate", low=0.0, low_open=True)
    generator_weight_decay: float = option(1e-2, "the generator's Adam weight decay", low=0.0)
    diversity_weight: float = option(1.0, "weight of the generator's diversity loss", low=0.0)
    alpha: float = option(10.0, "weight of the local term: the head classifies generated representations", low=0.0)
    beta: float = option(10.0, "weight of the local term: predictions on real data match the head's on G(y)",
                         low=0.0)
    decay: float = option(0.98, "per-round factor on generator_lr, alpha and beta", low=0.0, high=1.0,
                          low_open=True)


@register_algorithm("fedgen")
class FedGen(FedAvg):
    description = "FedAvg plus a server-trained generator of representations that regularises local training"
    reference = ("Zhu, Hong and Zhou, Data-Free Knowledge Distillation for Heterogeneous Federated Learning, "
                 "ICML 2021")
    Options = FedGenOptions
    batched_local_step = False  # its own local step (see local_update)

    def __init__(self, options: Mapping[str, Any], federation: Federation):
        super().__init__(options, federation)
        if not federation.label_counts:
            raise ConfigError("fedgen needs the clients' label counts (Federation.label_counts)")
        self.counts = np.asarray(federation.label_counts, dtype=np.float64)

    def new_generator(self, representation_dim: int) -> Generator:
        o = self.options
        return Generator(self.federation.num_classes, representation_dim, o.hidden_dim, o.noise_dim)

    # ---- server side -------------------------------------------------------------------
    def setup(self, initial_state: State) -> None:
        super().setup(initial_state)
        self.head_keys = head_keys(initial_state, self.federation.num_classes)
        dim = initial_state[self.head_keys[0]].shape[1]
        device = initial_state[self.head_keys[0]].device
        with torch.random.fork_rng(devices=[]):  # the generator's initial weights, without touching the global stream
            torch.manual_seed(derive_seed(self.federation.seed, "fedgen-init"))
            self.generator = self.new_generator(dim).to(device)
        self.optimiser = torch.optim.Adam(self.generator.parameters(), lr=self.options.generator_lr,
                                          weight_decay=self.options.generator_weight_decay)
        self.trained_rounds = 0

    def configure_train(self, round_idx: int, clients: list[int]) -> list[TrainTask]:
        payload: dict[str, Any] = {"round": round_idx}
        if self.trained_rounds > 0:
            payload["generator"] = {k: v.detach() for k, v in self.generator.state_dict().items()}
        return [TrainTask(c, i, self.global_model, payload) for i, c in enumerate(clients)]

    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        clients: list[int] = []

        def keep_heads(stream: Iterable[TrainResult]) -> Iterator[TrainResult]:
            w, b = self.head_keys
            for result in stream:
                heads.append((result.state[w].detach().clone(), result.state[b].detach().clone()))
                clients.append(result.client_id)
                yield result

        used = super().aggregate_train(round_idx, keep_heads(results), rng)
        if used:
            self.train_generator(round_idx, heads, self.counts[clients], rng)
        return used

    def train_generator(self, round_idx: int, heads: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        counts: np.ndarray, rng: torch.Generator) -> None:
        """Fit G so the label-weighted ensemble of the clients' heads classifies G(y) as y."""
        o = self.options
        qualified = np.flatnonzero(counts.max(axis=0) > MIN_SAMPLES_PER_LABEL)
        if qualified.size == 0 or o.generator_steps == 0:
            return
        device = self.generator.out.weight.device
        weights = torch.as_tensor(label_weights(counts), dtype=torch.float32, device=device)  # (clients, classes)
        qualified_t = torch.as_tensor(qualified, device=device)
        for group in self.optimiser.param_groups:
            group["lr"] = o.generator_lr * o.decay**self.trained_rounds
        self.generator.train()
        batch = o.gen_batch_size
        for _ in range(o.generator_steps):
            pick = torch.randint(qualified.size, (batch,), generator=rng, device=rng.device).to(device)
            labels = qualified_t[pick]
            eps = self.generator.noise(batch, rng)
            z = self.generator(labels, eps)
            teacher = z.new_zeros(())
            for k, (w, b) in enumerate(heads):
                per_sample = F.cross_entropy(F.linear(z, w, b), labels, reduction="none")
                teacher = teacher + (per_sample * weights[k, labels]).mean()
            loss = teacher + o.diversity_weight * diversity_loss(eps, z)
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
        self.trained_rounds += 1

    def round_metrics(self) -> dict[str, float]:
        return {"client_state_mb": 0.0}  # label counts are known up front; nothing is kept per client

    def server_state(self) -> dict[str, torch.Tensor]:
        tensors = {**super().server_state(), **prefixed("generator.", self.generator.state_dict()),
                   "generator_rounds": torch.tensor(self.trained_rounds)}
        for index, slots in self.optimiser.state_dict()["state"].items():
            for name, value in slots.items():
                tensors[f"generator_adam.{index}.{name}"] = torch.as_tensor(value)
        return tensors

    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_server_state(tensors)
        self.generator.load_state_dict(unprefixed("generator.", tensors))
        self.trained_rounds = int(tensors["generator_rounds"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in unprefixed("generator_adam.", tensors).items():
            index, _, slot = name.partition(".")
            state.setdefault(int(index), {})[slot] = value
        saved = self.optimiser.state_dict()
        saved["state"] = state
        self.optimiser.load_state_dict(saved)

    # ---- client side -------------------------------------------------------------------
    def local_update(self, model: nn.Module, task: TrainTask, x: torch.Tensor, y: torch.Tensor,
                     settings: LocalSettings, generator: torch.Generator) -> TrainResult:
        model.load_state_dict(task.state)
        loss_fn: LossFn = cross_entropy
        if "generator" in task.payload:
            o, round_idx = self.options, int(task.payload["round"])
            weight = task.payload["generator"]["out.weight"]
            gen = self.new_generator(weight.shape[0]).to(x.device)
            gen.load_state_dict(task.payload["generator"])
            gen.eval()
            # its own stream, so the batches' shuffling is the same as without the regulariser
            noise_rng = torch.Generator(device=generator.device)
            seed = generator.initial_seed()
            noise_rng.manual_seed(derive_seed(seed & 0xFFFFFFFF, "fedgen-client", seed >> 32))
            loss_fn = fedgen_loss(gen, decayed(o.alpha, o.decay, round_idx), decayed(o.beta, o.decay, round_idx),
                                  o.gen_batch_size, settings.batch_size, self.federation.num_classes, noise_rng)
        return self.sgd_result(model, task, x, y, settings, generator, loss_fn)[0]
