"""What ``fedmr landscape`` measures: a model named on the command line, and the run it belongs to.

A model is ``PATH`` or ``PATH@N`` / ``PATH@mean`` (member N of a pool of K models, or the pool's
mean), where PATH is

* a run folder (``config.toml`` beside the final ``model.safetensors``, or the study's kept copy
  ``final-model.safetensors``): the run's final global model;
* a checkpoint manifest, ``<run>/checkpoints/round-NNNNNN.json`` (or ``parked/``): the algorithm's
  server state after that round, its tensors checked against the manifest's sha256; FedAvg's family
  keeps one global model there (``global.*``), FedMR and FedIndep their pool (``pool.*``, K models
  stacked), whose global model is the pool's mean;
* a safetensors file: a global model (``model.safetensors``, ``models/round-NNNNNN.safetensors``
  written with ``save_model_every``) or a pool (``models/round-NNNNNN-pool.safetensors``,
  ``save_pool = true``).

The run (by default the nearest folder above PATH holding ``config.toml``; ``--run DIR`` names
another) gives the data and the architecture: its config is read back as ``fedmr run --resume``
reads it, and the data set is loaded as the run loaded it.  A model that does not fit the
architecture, or data the model cannot take, is one ``fedmr: error:`` line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import RunConfig, load_config
from ..data import DataSet, load_dataset
from ..engine.checkpoint import load_tensors, read_checkpoint
from ..engine.experiment import resolve_device
from ..errors import CheckpointError, ConfigError, DataError
from ..maths import State, pool_mean, slot
from ..models import model_builder
from ..results import KEPT_MODEL_FILE, MODEL_FILE

FINAL = (MODEL_FILE, KEPT_MODEL_FILE)  # the run's own, then the study's kept copy
_MEMBER = re.compile(r"^(.*)@(\d+|mean)$")


@dataclass(frozen=True)
class ModelRef:
    text: str  # as given
    path: Path
    member: int | str | None  # None: the global model; "mean": the pool's mean; N: pool member N


def parse_ref(text: str) -> ModelRef:
    match = _MEMBER.match(text)
    if match and not Path(text).exists():
        member: int | str = match.group(2) if match.group(2) == "mean" else int(match.group(2))
        return ModelRef(text, Path(match.group(1)), member)
    return ModelRef(text, Path(text), None)


def run_folder_of(path: Path) -> Path | None:
    """The run folder a file or folder belongs to: itself or the nearest folder above it with config.toml."""
    for place in [path, *path.parents] if path.is_dir() else list(path.parents):
        if (place / "config.toml").is_file():
            return place
    return None


@dataclass
class Loaded:
    """One model to measure: its state dict and where it came from."""

    ref: ModelRef
    run: Path  # the run folder whose config gives the data and architecture
    kind: str  # "final", "checkpoint" or "file"
    round: int | None  # the round after which it was saved, where known
    state: State
    pool_size: int | None  # K when the file holds a pool

    @property
    def stem(self) -> str:
        """The output files' stem: "landscape" for a run's final model, "<file stem>[-mN]-landscape" otherwise."""
        member = "" if self.ref.member is None else "-mean" if self.ref.member == "mean" else f"-m{self.ref.member}"
        if self.kind == "final":
            return "landscape" + member
        return f"{self.ref.path.stem}{member}-landscape"

    @property
    def label(self) -> str:
        """A short name for another model's end of a path (file names, plot legends)."""
        member = "" if self.ref.member is None else "-mean" if self.ref.member == "mean" else f"-m{self.ref.member}"
        return (self.run.name if self.kind == "final" else self.ref.path.stem) + member

    def describe(self) -> dict[str, object]:
        return {"input": self.ref.text, "run": str(self.run), "kind": self.kind, "round": self.round,
                "member": self.ref.member, "pool_size": self.pool_size}


def _strip(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _model_or_pool(tensors: Mapping[str, torch.Tensor], where: Path) -> tuple[State | None, State | None]:
    """(global state, pool) from a server state or a plain state dict (one of them None)."""
    if any(k.startswith("state.") for k in tensors):  # a checkpoint's own tensor file, named directly
        tensors = _strip("state.", tensors)
    pool = _strip("pool.", tensors)
    if pool:
        return None, pool
    found = _strip("global.", tensors)
    if found:
        return found, None
    if any(k.startswith(("c.", "c_i.", "initial.", "previous.", "generator")) for k in tensors):
        raise CheckpointError(f"{where} holds an algorithm's state without a global model or pool")
    return dict(tensors), None


def load_model(ref: ModelRef, run: Path | None = None) -> Loaded:
    """The state dict ``ref`` names; ``run`` overrides the run folder it is measured with."""
    path = ref.path
    if not path.exists():
        raise ConfigError(f"{ref.text}: no such file or folder")
    round_: int | None = None
    folder: Path | None
    if path.is_dir():
        if not (path / "config.toml").is_file():
            raise ConfigError(f"{path} is not a fedmr run folder (no config.toml); give a run folder, a checkpoint "
                              "(checkpoints/round-NNNNNN.json) or a .safetensors model")
        final = next((path / name for name in FINAL if (path / name).is_file()), None)
        if final is None:
            raise ConfigError(f"{path} holds no final model (model.safetensors): the run has not finished; give one of "
                              f"its checkpoints, {path}/checkpoints/round-NNNNNN.json")
        kind, tensors, folder = "final", load_tensors(final), path
    elif path.suffix == ".json":
        ckpt = read_checkpoint(path)
        kind, tensors, round_, folder = "checkpoint", ckpt.server_state, ckpt.rounds_done, run_folder_of(path)
    elif path.suffix == ".safetensors":
        kind, tensors, folder = "file", load_tensors(path), run_folder_of(path)
        match = re.match(r"^round-(\d+)", path.stem)
        round_ = int(match.group(1)) if match else None
    else:
        raise ConfigError(f"{ref.text}: not a run folder, a checkpoint (.json) or a .safetensors model")
    folder = run if run is not None else folder
    if folder is None:
        raise ConfigError(f"{path} lies in no run folder (none above it holds config.toml); name the run with --run DIR")
    model, pool = _model_or_pool(tensors, path)
    if pool is not None:
        k = int(next(iter(pool.values())).shape[0])
        if ref.member is None or ref.member == "mean":
            state = pool_mean(pool)
        elif ref.member >= k:  # type: ignore[operator]  # an int here
            raise ConfigError(f"{ref.text}: the pool holds {k} models, numbered 0 to {k - 1}")
        else:
            state = {key: v.clone() for key, v in slot(pool, int(ref.member)).items()}
        return Loaded(ref, folder, kind, round_, state, k)
    if ref.member is not None:
        raise ConfigError(f"{ref.text}: {path} holds one global model, not a pool of models; drop '@{ref.member}'")
    assert model is not None
    return Loaded(ref, folder, kind, round_, model, None)


@dataclass
class Run:
    """A run's config, its data (as the run loaded them) and its architecture."""

    folder: Path
    cfg: RunConfig
    data: DataSet
    model_name: str
    build: Callable[[], nn.Module]
    device: torch.device


def open_run(folder: Path, assignments: Iterable[str] = ()) -> Run:
    """Read ``folder``'s config.toml (with ``--set`` changes, e.g. where the data lie now) and load its data."""
    if not (folder / "config.toml").is_file():
        raise ConfigError(f"{folder} is not a fedmr run folder (no config.toml)")
    cfg = load_config(folder / "config.toml", assignments)
    data = load_dataset(cfg)
    name, build, _ = model_builder(cfg.model, data)
    device = resolve_device(cfg.device)
    return Run(folder, cfg, data, name, build, device)


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def fitted_model(run: Run, loaded: Loaded, dtype: torch.dtype) -> nn.Module:
    """``run``'s architecture holding ``loaded``'s weights, in evaluation mode, on the run's device;
    a state that does not fit (another model, or data of another shape) is a one-line error."""
    model = run.build()
    wanted = model.state_dict()
    where = f"{loaded.ref.text} does not fit run {run.folder}'s model ({run.model_name} for {run.data.name} " \
            f"samples of shape {'x'.join(map(str, run.data.input_shape))}, {run.data.num_classes} classes)"
    missing = [k for k in wanted if k not in loaded.state]
    if missing:
        raise CheckpointError(f"{where}: it lacks '{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = [k for k in loaded.state if k not in wanted]
    if extra:
        raise CheckpointError(f"{where}: it holds '{extra[0]}', which the model has not")
    for key, value in wanted.items():
        if value.shape != loaded.state[key].shape:
            raise CheckpointError(f"{where}: '{key}' is {_shape(loaded.state[key])} in the file, {_shape(value)} in the model")
    model.load_state_dict(loaded.state)
    model = model.to(run.device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def samples(run: Run, count: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` training samples (all of them when fewer), drawn without replacement by ``generator``,
    in the data set's order."""
    n = int(run.data.train_y.shape[0])
    if n == 0:
        raise DataError(f"data set '{run.data.name}' has no training samples to measure on")
    index = torch.sort(torch.randperm(n, generator=generator)[:min(count, n)]).values
    x = run.data.train_x[index.to(run.data.train_x.device)].to(run.device)
    y = run.data.train_y[index.to(run.data.train_y.device)].to(run.device)
    if x.is_floating_point() and dtype != x.dtype:
        x = x.to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def check_data_fits(model: nn.Module, run: Run, x: torch.Tensor) -> None:
    """The model maps the data's samples to one logit per class."""
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as exc:
        raise DataError(f"run {run.folder}'s model cannot take the data set '{run.data.name}' (samples of shape "
                        f"{'x'.join(map(str, run.data.input_shape))}): {str(exc).splitlines()[0]}") from None
    if out.dim() != 2 or out.shape[1] != run.data.num_classes:
        raise DataError(f"run {run.folder}'s model gives {tuple(out.shape)[1:]} outputs per sample, but the data set "
                        f"'{run.data.name}' has {run.data.num_classes} classes")
