"""Deployment on loopback: `flower-superlink` + 2 `flower-supernode`s, 2 rounds of FedMR, first
insecure, then with TLS certificates and SuperNode authentication made here; every process is
stopped and nothing listened outside 127.0.0.1."""

from __future__ import annotations

import csv
import datetime
import ipaddress
import json
import subprocess

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedmr[flower]')")
pytestmark = pytest.mark.slow  # starts Ray / Flower processes: minutes on 2 cores

from cryptography import x509  # noqa: E402  (a dependency of flwr)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from test_flower_helpers import (  # noqa: E402
    BIN,
    START_TIMEOUT,
    FlowerProcesses,
    flower_env,
    flwr_run,
    free_port,
    wait_for,
    write_connection,
)

RUN = "num_clients=2 clients_per_round=2 rounds=2 local_epochs=1 eval_every=1 seed=5"


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(folder):
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmr test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: folder / f"{name}.pem" for name in ("ca", "server", "server-key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["server-key"].write_bytes(_pem_key(key))
    return paths


def make_node_key(folder, name):
    """An EC key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` makes for SuperNode auth."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def rows(out):
    with (out / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def start_federation(procs, tag, link_args):
    port = free_port()
    procs.start(f"superlink-{tag}", "flower-superlink", *link_args, "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation")
    wait_for(lambda: "Uvicorn running" in procs.log(f"superlink-{tag}"), START_TIMEOUT, f"the {tag} SuperLink")
    return port


def start_nodes(procs, tag, port, node_args):
    for i, extra in enumerate(node_args):
        procs.start(f"supernode-{tag}-{i}", "flower-supernode", *extra, "--superlink", f"127.0.0.1:{port}",
                    "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", f"partition-id={i} num-partitions={len(node_args)}")


def test_superlink_and_two_supernodes_insecure_then_tls_with_node_auth(tmp_path):
    home = tmp_path / "flwr-home"
    env = flower_env(home)
    procs = FlowerProcesses(tmp_path, env)
    try:
        # 1. insecure, loopback
        port = start_federation(procs, "insecure", ["--insecure"])
        start_nodes(procs, "insecure", port, [["--insecure"], ["--insecure"]])
        write_connection(home, "insecure", port)
        out = tmp_path / "insecure"
        flwr_run(env, "insecure", f'{RUN} flower.out="{out}"')
        got = rows(out)
        assert [r["round"] for r in got] == ["1", "2"] and all(r["clients"] == "2" for r in got)

        # 2. TLS and SuperNode authentication: only registered keys may connect
        tls = make_tls(tmp_path)
        port = start_federation(procs, "tls", ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["server"]),
                                               "--ssl-keyfile", str(tls["server-key"]), "--enable-supernode-auth"])
        write_connection(home, "tls", port, root_certificates=tls["ca"])
        keys = [make_node_key(tmp_path, f"node{i}") for i in range(2)]
        for _, public in keys:
            done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), "tls"], env=env,
                                  capture_output=True, text=True, timeout=START_TIMEOUT)
            assert done.returncode == 0, done.stdout + done.stderr
        start_nodes(procs, "tls", port, [["--root-certificates", str(tls["ca"]), "--auth-supernode-private-key",
                                          str(private)] for private, _ in keys])
        out = tmp_path / "tls"
        flwr_run(env, "tls", f'{RUN} flower.out="{out}"')
        got_tls = rows(out)
        assert [r["round"] for r in got_tls] == ["1", "2"] and all(r["clients"] == "2" for r in got_tls)
        # the same seed and config on another transport: the same run
        assert [r["accuracy"] for r in got_tls] == [r["accuracy"] for r in got]
        assert "--insecure" not in procs.log("superlink-tls") and "--insecure" in procs.log("superlink-insecure")
    finally:
        procs.stop()
    assert not procs.alive(), f"processes left running: {procs.alive()}"
    assert procs.listening, "the watcher saw no listening socket at all"
    assert procs.outside_loopback() == []


# ---- each site with only its own data --------------------------------------------------------

# Loaded by every Python process started with PYTHONPATH=<its folder> (site imports sitecustomize):
# an audit hook that logs each file or folder it opens or lists under FEDMR_TEST_WATCH.
OPEN_WATCH = '''
import os, sys
_watch, _log, _busy = os.environ.get("FEDMR_TEST_WATCH"), os.environ.get("FEDMR_TEST_OPEN_LOG"), [False]
def _hook(event, args):
    if _busy[0] or event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    path = args[0]
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        return
    if _watch not in os.path.abspath(path):
        return
    _busy[0] = True
    try:
        fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()} {event} {os.path.abspath(path)}\\n".encode())
        os.close(fd)
    finally:
        _busy[0] = False
if _watch and _log:
    sys.addaudithook(_hook)
'''

# eval_every = 2: one evaluation (central: none, the server has no data; federated: the 3 sites), after round 2
SITES_RUN = ('num_clients=3 clients_per_round=3 rounds=2 local_epochs=1 eval_every=2 seed=5 dataset="imagefolder" '
             'normalization="cifar10" flower.data="node" flower.fraction_evaluate=1.0')


def watched_env(env, hook_dir, watch, log):
    return {**env, "PYTHONPATH": str(hook_dir), "FEDMR_TEST_WATCH": str(watch), "FEDMR_TEST_OPEN_LOG": str(log)}


def opened(log):
    return [line.split(" ", 2)[2] for line in log.read_text().splitlines()] if log.exists() else []


def test_three_sites_each_with_only_its_own_data_dir(tmp_path):
    """3 SuperNodes, each started with one folder of `fedmr partition --export`; FedMR, 2 rounds,
    federated evaluation, no data on the server.  An audit hook in every process (SuperNodes, their
    ClientApps, the SuperLink and its ServerApp) logs what each opened under the export folder."""
    from fedmr.cli import main

    sites = tmp_path / "sites"
    assert main(["partition", "--set", "num_clients=3", "--set", "clients_per_round=3", "--set", "seed=5",
                 "--export", str(sites)]) == 0
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OPEN_WATCH)
    home = tmp_path / "flwr-home"
    env = flower_env(home)
    procs = FlowerProcesses(tmp_path, env)
    try:
        port = free_port()
        procs.start("superlink-sites", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                    "--disable-runtime-dependency-installation",
                    env=watched_env(env, hook, sites, tmp_path / "server.opens"))
        wait_for(lambda: "Uvicorn running" in procs.log("superlink-sites"), START_TIMEOUT, "the SuperLink")
        for i in range(3):
            procs.start(f"supernode-site-{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(free_port()),
                        "--node-config", f'data-dir="{sites}/client-{i:03d}"',
                        env=watched_env(env, hook, sites, tmp_path / f"node{i}.opens"))
        write_connection(home, "sites", port)
        out = tmp_path / "out"
        flwr_run(env, "sites", f'{SITES_RUN} flower.out="{out}"')
        got = rows(out)
        assert [r["round"] for r in got] == ["2"] and all(r["clients"] == "3" for r in got)
        assert all(r["accuracy"] == "" for r in got), "no test set on the server: no central accuracy"
        assert all(0 < float(r["fed_accuracy"]) <= 1 and float(r["fed_loss"]) > 0 for r in got)
        assert all(r["fed_examples"] == "359" for r in got), "all three local test parts (the digits test split)"
        listed = json.loads((out / "sites.json").read_text())["clients"]
        assert not (out / "partition.json").exists(), "the server has no sample indices to write"
        assert sorted(c["data-dir"] for c in listed) == [str(sites / f"client-{i:03d}") for i in range(3)]

        for i in range(3):
            mine = opened(tmp_path / f"node{i}.opens")
            assert any(p.endswith(".png") for p in mine), f"node {i} read no image"
            strays = [p for p in mine if not p.startswith(str(sites / f"client-{i:03d}"))]
            assert strays == [], f"node {i} opened another site's files: {strays[:3]}"
        assert opened(tmp_path / "server.opens") == [], "the server side opened site data"

        # a fourth node without data-dir: the run stops with one line that says so
        procs.start("supernode-site-bare", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                    "--host", "127.0.0.1", "--port", str(free_port()))
        # node_wait: how long the server waits for the fourth node, just started; it stops as soon as that node answers
        text = flwr_run(env, "sites", f'{SITES_RUN.replace("num_clients=3", "num_clients=4")} '
                                      f'flower.out="{tmp_path / "bad"}" flower.node_wait={START_TIMEOUT:.0f}', check=False)
        assert "fedmr: error: node" in text and "no data-dir in its node config" in text, text[-3000:]
    finally:
        procs.stop()
    assert not procs.alive(), f"processes left running: {procs.alive()}"
    assert procs.outside_loopback() == []
