"""`search.run --address` sweeps on a real Ray cluster started with `ray start --head`.

`ray stop` stops every Ray process it can see, so the head lives in its own PID
namespace (`unshare`), where `ray stop` sees only that head: the test's own Ray,
and any other on the machine, are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import free_port, run_module, small_sweep, start_search_run, sweep_args
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
NUM_SAMPLES = 2

# A user's own space, in a file outside the package: it searches what the assignment's spaces never
# did, a kernel and the batch size.
SPACE_FILE = """
from spaces import register_space


@register_space(summary="kernel and batch of the Module model", first_point={"kernel_1": 5, "batch_size": 32})
def kernels(trial):
    trial.suggest_categorical("kernel_1", [3, 5])
    trial.suggest_categorical("batch_size", [16, 32])
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    return {"model": "module", "optimizer": "sgd", "momentum": 0.0, "channel_1": 8, "channel_2": 8}
"""

# Started in the namespace: starts a head, says so, waits for a line on stdin, then stops it.
HEAD_SCRIPT = """
set -e
"$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=2 --include-dashboard=false \
    --temp-dir="$TEMP_DIR" --disable-usage-stats > "$TEMP_DIR/start.log" 2>&1
echo started
read _
"$RAY" stop > "$TEMP_DIR/stop.log" 2>&1
echo stopped
"""


@pytest.fixture
def ray_head():
    """A Ray head on loopback at a free port, with its own token, stopped by `ray stop` afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    # As the README says: a cluster checks a token, and a driver that joins by address sends it.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    namespace = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        namespace.insert(1, "--map-root-user")
    head = subprocess.Popen(
        [*namespace, "bash", "-c", HEAD_SCRIPT],
        env={**os.environ, **auth, "RAY": RAY, "PORT": str(port), "TEMP_DIR": str(temp_dir)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert head.stdout.readline().strip() == "started", (temp_dir / "start.log").read_text()
    try:
        yield {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "auth": auth}
    finally:
        stdout, _ = head.communicate("stop\n", timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert stdout.strip() == "stopped"


def test_a_users_space_sweeps_on_an_existing_ray_cluster_and_its_best_retrains(
    ray_head, image_folder, tmp_path, monkeypatch
):
    for name, value in ray_head["auth"].items():
        monkeypatch.setenv(name, value)
    space_file = tmp_path / "team" / "my_spaces.py"
    space_file.parent.mkdir()
    space_file.write_text(SPACE_FILE)
    # Shared storage as a multi-node sweep names it: a URI that pyarrow's filesystems resolve.
    settings = small_sweep(
        image_folder,
        tmp_path,
        space=f"{space_file}:kernels",
        num_samples=NUM_SAMPLES,
        storage_path=f"file://{tmp_path}/ray",
        name="on-cluster",
    )
    tracking_uri = settings.tracking_uri
    sweep = start_search_run(
        [*sweep_args(settings), "--address", ray_head["address"], "--quiet"], cwd=tmp_path
    )
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stderr

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("cifar10-kernels")
    children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
    assert len(children) == NUM_SAMPLES and all(run.info.status == "FINISHED" for run in children)
    for child in children:  # configs of the user's function, trained as they say
        assert child.data.params["kernel_1"] in {"3", "5"} and child.data.params["batch_size"] in {"16", "32"}
        assert child.data.params["model"] == "module"
    (parent,) = client.search_runs([experiment.experiment_id], "tags.role = 'sweep'")
    assert parent.data.tags["space"] == f"{space_file}:kernels"
    space = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "space.json", str(tmp_path))).read_text()
    )
    kernel = space["searched"]["kernel_1"]
    assert (kernel["range"], kernel["from"]) == ("one of [3, 5]", "the space")
    importance = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "importance.json", str(tmp_path))).read_text()
    )
    assert {"kernel_1", "batch_size", "lr"} <= set(json.dumps(importance).replace('"', " ").split())

    # The trials ran on that head: each result's worker pid (as seen in the head's PID namespace)
    # is one of the head's own trial workers, named in the head's logs.
    results = [json.loads(line) for path in (tmp_path / "ray" / "on-cluster").glob("*/result.json")
               for line in path.read_text().splitlines()]  # fmt: skip
    assert len({result["trial_id"] for result in results}) == NUM_SAMPLES
    logs = next(ray_head["temp_dir"].glob("session_2*")) / "logs"
    head_trial_workers = {
        int(path.stem.rsplit("-", 1)[1])
        for path in logs.glob("worker-*.out")
        if ":actor_name:train_convnet" in path.read_text(errors="replace")
    }
    assert {result["pid"] for result in results} <= head_trial_workers

    # Its best exported and retrained, as for the assignment's spaces.
    best = tmp_path / "best.json"
    tracking = ["--tracking-uri", tracking_uri]
    exported = run_module(
        "search.export", "--experiment", "cifar10-kernels", *tracking, "--out", str(best), cwd=tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    assert json.loads(best.read_text())["space"] == f"{space_file}:kernels"
    metrics = tmp_path / "metrics.json"
    retrained = run_module(
        "search.retrain", str(best), "--epochs", "1", "--out", str(metrics), cwd=tmp_path, timeout=300
    )
    assert retrained.returncode == 0, retrained.stderr
    assert 0.0 <= json.loads(metrics.read_text())["test_acc"] <= 1.0
