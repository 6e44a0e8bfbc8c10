"""FedARC in Flower's real runtimes: the simulation engine (Ray) with 5 sites, SecAgg+ in the simulation engine
with a check that the server's inputs are masked, and a SuperLink with SuperNodes as separate processes on the
loopback address (insecure mode: plain HTTP on 127.0.0.1 only, started and stopped by the test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr.serverapp")
pytest.importorskip("ray")

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from lightning_clip.flower import FedARC, SiteContext, lightning_client_app  # noqa: E402
from lightning_clip.tags import ARC_CLIPPED_RANKS  # noqa: E402
from tests.helpers.flower import initial_arrays, site_data, site_module  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SITES = 5
BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "include_dashboard": False}}

pytestmark = pytest.mark.distributed


@pytest.fixture(autouse=True)
def _importable_repo(monkeypatch):
    # Ray's workers and Flower's app processes import this repository's modules (tests.helpers): put it on their path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")


def _flat(record: ArrayRecord) -> torch.Tensor:
    return torch.cat([torch.from_numpy(record[k].numpy()).reshape(-1) for k in record])


def _nan_site(update: torch.Tensor, site: SiteContext) -> torch.Tensor:
    return torch.full_like(update, float("nan")) if site.site == 3 else update


def test_simulation_engine_five_sites_one_nan_site():
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedARC(num_byzantine=1, aggregator="cwtm", nnm=True, min_train_nodes=SITES,
                          min_available_nodes=SITES, fraction_evaluate=1.0, min_evaluate_nodes=SITES)
        out["result"] = strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=2, timeout=120)
        out["strategy"] = strategy

    client = lightning_client_app(site_module, site_data, steps=2, update_transform=_nan_site)
    run_simulation(server_app=server, client_app=client, num_supernodes=SITES, backend_config=BACKEND)
    result, strategy = out["result"], out["strategy"]
    assert bool(torch.isfinite(_flat(result.arrays)).all())
    assert not torch.equal(_flat(result.arrays), _flat(initial_arrays()))
    assert len(strategy.last_node_ids) == SITES
    for r in (1, 2):
        assert result.train_metrics_clientapp[r][ARC_CLIPPED_RANKS] >= 1  # the NaN site, zeroed by ARC
        assert np.isfinite(result.evaluate_metrics_clientapp[r]["val_loss"])
    assert result.evaluate_metrics_clientapp[2]["val_loss"] < result.evaluate_metrics_clientapp[1]["val_loss"] * 1.5


class _RecordingGrid:
    """The ServerApp's grid, recording every reply the server receives (what the server gets to see)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def test_secagg_plus_the_server_sees_masked_vectors_and_recovers_the_mean_of_clipped_updates(tmp_path):
    clip, levels = 0.05, 1 << 22
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()

    def record_raw(msg, context, call_next):
        # inside secaggplus_mod: what the site computed before masking (the test's view, not the server's)
        reply = call_next(msg, context)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        rnd = msg.content.config_records["fitins.config"]["server-round"]
        flat = np.concatenate([a.reshape(-1) for a in parameters_to_ndarrays(fitres.parameters)])
        np.save(raw_dir / f"{context.node_id}-{rnd}.npy", flat)
        return reply

    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        recording = _RecordingGrid(grid)
        workflow = SecAggPlusWorkflow(num_shares=SITES, reconstruction_threshold=3, clipping_range=clip,
                                      max_weight=1.0, quantization_range=levels)
        strategy = FedARC(num_byzantine=0, arc=False, static_clip=clip, min_train_nodes=SITES,
                          min_available_nodes=SITES, fraction_evaluate=0.0, secure_aggregation=workflow)
        start = initial_arrays()
        result = strategy.start(grid=recording, initial_arrays=start, num_rounds=2, timeout=120)
        out.update(result=result, strategy=strategy, replies=recording.replies, start=start)

    client = lightning_client_app(site_module, site_data, steps=2, mods=[secaggplus_mod, record_raw])
    run_simulation(server_app=server, client_app=client, num_supernodes=SITES, backend_config=BACKEND)

    masked = {}
    for reply in out["replies"]:
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no raw arrays, ever
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            masked.setdefault(reply.metadata.src_node_id, []).append(arrays)  # rounds in order
    assert len(masked) == SITES and all(len(v) == 2 for v in masked.values())
    step = 2 * clip / levels
    raws = {}
    for node, vectors in masked.items():
        for r, arrays in enumerate(vectors, start=1):
            raw = np.load(raw_dir / f"{node}-{r}.npy")
            raws.setdefault(r, []).append(raw)
            assert np.linalg.norm(raw) <= clip * (1 + 1e-5)  # the site clipped its update
            ints = np.concatenate([a.reshape(-1) for a in arrays[1:]]).astype(np.int64)
            quantized_raw = np.round((raw + clip) / step).astype(np.int64)
            # the server's input is the quantized update plus masks uniform mod 2^32: almost never near the raw one
            off = (ints - quantized_raw) % (1 << 32)
            near = np.minimum(off, (1 << 32) - off) < 1000
            assert near.mean() < 0.01, near.mean()
    # the protocol reveals the mean of the clipped updates (the last round's), up to the stochastic quantization
    last = out["strategy"].last_aggregate.double().numpy()
    expected = np.mean(raws[2], axis=0)
    assert np.abs(last - expected).max() <= 2 * step
    assert np.abs(expected).max() > 50 * step  # not vacuous: the mean is far above the quantization error


# ----------------------------------------------------------------------------- SuperLink + SuperNodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the SuperLink exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds:g} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def test_superlink_and_supernodes_as_separate_processes_on_loopback(tmp_path):
    bin_dir = Path(sys.executable).parent
    superlink, flwr = bin_dir / "flower-superlink", bin_dir / "flwr"
    if not superlink.exists() or not flwr.exists():
        pytest.skip("Flower's command-line tools are not installed next to this Python")
    sites, rounds = 3, 1
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(Path(__file__).with_name("deployed_app.py"), app / "deployed_app.py")
    (app / "pyproject.toml").write_text(f"""
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedarc-e2e"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lightning-clip-tests"

[tool.flwr.app.components]
serverapp = "deployed_app:server_app"
clientapp = "deployed_app:client_app"

[tool.flwr.app.config]
num-server-rounds = {rounds}
num-sites = {sites}
out-dir = "{tmp_path}"
""")
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    # the SuperLink and SuperNodes start Flower's app processes by name: this Python's tools come first
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    handles = []

    def log_file(name: str):
        handles.append(open(logs / name, "w"))  # noqa: SIM115  (closed in `finally`)
        return handles[-1]

    try:
        procs.append(subprocess.Popen(
            [str(superlink), "--insecure", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=log_file("superlink.log"), stderr=subprocess.STDOUT))
        _wait_for_port(port, procs[0])
        for i in range(sites):
            procs.append(subprocess.Popen(
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                 "--host", "127.0.0.1", "--port", str(_free_port()),
                 "--node-config", f"partition-id={i} num-partitions={sites}"],
                env=env, stdout=log_file(f"supernode{i}.log"), stderr=subprocess.STDOUT))
        # bounded: each message starts a ClientApp process (imports torch and Lightning), slow on a busy machine
        run = subprocess.run([str(flwr), "run", str(app), "local", "--stream"], env=env, capture_output=True,
                             text=True, timeout=540)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        result_path = tmp_path / "result.json"
        deadline = time.monotonic() + 60
        while not result_path.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert result_path.exists(), run.stdout[-3000:] + (logs / "superlink.log").read_text()[-2000:]
        summary = json.loads(result_path.read_text())
    finally:
        _stop(procs)
        for fh in handles:
            fh.close()
    assert all(p.returncode is not None for p in procs)
    assert summary["finite"] and summary["moved"] > 0  # the NaN site did not poison the model
    assert summary["pid"] != os.getpid()  # the ServerApp ran in its own process
    assert len(summary["node_ids"]) == sites
    for r in map(str, range(1, rounds + 1)):
        assert summary["train"][r][ARC_CLIPPED_RANKS] >= 1
        assert np.isfinite(summary["train"][r]["train_loss"])
