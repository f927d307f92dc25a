"""Property-based: random config files, --set strings, overrides, partition files and checkpoint manifests
reach the parsers, which must either accept them or raise the project's own errors, never anything else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedmr.config import RunConfig, default_config, load_config, merge, parse_assignment, validate
from fedmr.engine.checkpoint import read_checkpoint
from fedmr.engine.compare import parse_variant
from fedmr.errors import CheckpointError, FedMRError, PartitionError
from fedmr.partition import load_partition

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TMP = Path(tempfile.mkdtemp(prefix="fedmr-fuzz-"))

_defaults = default_config()
TOP_KEYS = [k for k, v in _defaults.items() if not isinstance(v, dict)]
SECTIONS = {k: list(v) for k, v in _defaults.items() if isinstance(v, dict)}
KEYS = st.sampled_from(TOP_KEYS + list(SECTIONS)) | st.text(min_size=1, max_size=8)
# text that has crashed parsers before: huge integers (Python refuses > 4300 digits), deep nesting
nasty = st.sampled_from(["9" * 5000, "[" * 3000, "[" * 3000 + "]" * 3000, "{" * 3000, "1\nrounds = 2", "\x00", "nan", "-inf"])

scalars = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers() | st.integers(min_value=2**64, max_value=10**450)
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["auto", "cpu", "cuda", "iid", "dirichlet", "file", "natural", "fedmr", "fedavg", "digits", ""])
    | st.datetimes() | st.dates()
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=6)


def _section_overrides():
    return st.sampled_from(sorted(SECTIONS)).flatmap(
        lambda name: st.dictionaries(st.sampled_from(SECTIONS[name] or ["x"]) | st.text(max_size=5), values, max_size=3)
        .map(lambda d: {name: d}))


overrides = st.dictionaries(KEYS, values, max_size=5) | _section_overrides()


def _only_project_errors(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except FedMRError:
        return None


def _write(name: str, data: bytes) -> Path:
    path = TMP / name
    path.write_bytes(data)
    return path


@FUZZ
@given(overrides)
def test_random_config_files_give_a_config_or_a_config_error(doc):
    try:
        text = tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):  # not representable in TOML (e.g. NaN inside arrays of mixed types)
        return
    cfg = _only_project_errors(load_config, _write("c.toml", text))
    assert cfg is None or isinstance(cfg, RunConfig)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.tuples(st.sampled_from(["rounds = ", "a = ", "[fedmr]\nblock_fraction = ", "lr = "]), nasty)
       .map(lambda t: "".join(t).encode()))
@example(b"rounds = " + b"9" * 5000)
@example(b"a = " + b"[" * 5000 + b"]" * 5000)
def test_random_bytes_as_a_config_file(data):
    _only_project_errors(load_config, _write("raw.toml", data))


@FUZZ
@given(st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", KEYS, st.text(max_size=12))
                | st.builds(lambda k, v: f"{k}={json.dumps(v) if isinstance(v, (int, float, bool, str)) else v}",
                            st.sampled_from(TOP_KEYS + [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]), scalars)
                | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(TOP_KEYS), nasty),
                max_size=4))
@example(["rounds=1\nrounds=2"])
@example(["rounds=" + "9" * 5000])
@example(["lr=" + "[" * 5000])
@example(["data_dir=\"a\x00b\""])
def test_random_set_strings(items):
    for item in items:
        _only_project_errors(parse_assignment, item)
    _only_project_errors(load_config, None, items)


@FUZZ
@given(overrides)
@example({"lr": 10**400})
@example({"fedmr": {"block_fraction": 10**400}})
@example({"seed": 2**70})
def test_merge_then_validate_random_overrides(doc):
    cfg = default_config()
    if _only_project_errors(merge, cfg, doc) is not None:
        _only_project_errors(validate, cfg)


@FUZZ
@given(st.text(max_size=40))
def test_random_algorithm_variants(spec):
    parsed = _only_project_errors(parse_variant, spec)
    if parsed is not None:
        name, options = parsed
        cfg = default_config()
        cfg["algorithm"] = name
        if name in SECTIONS and _only_project_errors(merge, cfg, {name: options}) is not None:
            _only_project_errors(validate, cfg)


indices = st.integers(min_value=-3, max_value=40) | st.integers() | st.floats() | st.text(max_size=3) | st.booleans() | st.none()
client_ids = st.integers(min_value=0, max_value=5).map(str) | st.text(max_size=4) | st.sampled_from(["٣", " 1", "1_0", "0x1"])
partition_docs = st.fixed_dictionaries(
    {"train_data": st.dictionaries(client_ids, st.lists(indices, max_size=8) | indices, max_size=6)
     | st.lists(st.lists(indices, max_size=4), max_size=4) | values},
    optional={"num_users": st.integers(min_value=-1, max_value=8) | values, "dataset": values},
)


@FUZZ
@given(partition_docs | values, st.integers(min_value=0, max_value=50), st.none() | st.integers(min_value=1, max_value=6))
@example({"train_data": {"0": [0], " 1": [1]}}, 5, None)
@example({"train_data": {"0": [0], "01": [1]}}, 5, None)
@example({"train_data": {"0": [2**70]}}, 5, None)
def test_random_partition_files(doc, num_samples, num_clients):
    try:
        text = json.dumps(doc, default=str)
    except (ValueError, RecursionError):
        return
    parts = _only_project_errors(load_partition, _write("p.json", text.encode()), num_samples, num_clients)
    if parts is not None:  # accepted: every index an int in range, used once, no client empty
        flat = [i for p in parts for i in p]
        assert all(p for p in parts) and len(set(flat)) == len(flat) and all(0 <= i < num_samples for i in flat)
        assert num_clients is None or len(parts) == num_clients


@FUZZ
@given(st.binary(max_size=300) | nasty.map(str.encode))
@example(b"[" * 100000)
@example(b'{"train_data": {"0": [' + b"9" * 5000 + b"]}}")
def test_random_bytes_as_a_partition_file(data):
    try:
        load_partition(_write("raw.json", data), 20)
    except PartitionError:
        pass


manifest_docs = st.fixed_dictionaries(
    {"manifest_sha256": st.text(max_size=64) | values},
    optional={"format": st.just(1) | values, "round": values, "tensors": values, "sha256": values, "rows": values,
              "elapsed_s": values, "generators": values, "state_keys": values, "fingerprint": values},
)


@FUZZ
@given(manifest_docs | values | st.binary(max_size=100))
def test_random_checkpoint_manifests(doc):
    data = doc if isinstance(doc, bytes) else json.dumps(doc, default=str).encode()
    try:
        read_checkpoint(_write("round-000001.json", data))
    except CheckpointError:
        pass
    else:  # pragma: no cover - a random manifest can never hold a matching checksum
        raise AssertionError("a random manifest was accepted")
