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
from conftest import free_port, small_sweep, start_search_run, sweep_args
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
NUM_SAMPLES = 2

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


def test_a_sweep_runs_its_trials_on_an_existing_ray_cluster(ray_head, image_folder, tmp_path, monkeypatch):
    for name, value in ray_head["auth"].items():
        monkeypatch.setenv(name, value)
    # Shared storage as a multi-node sweep names it: a URI that pyarrow's filesystems resolve.
    settings = small_sweep(
        image_folder,
        tmp_path,
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
    experiment = client.get_experiment_by_name("cifar10-nesterov")
    children = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
    assert len(children) == NUM_SAMPLES and all(run.info.status == "FINISHED" for run in children)

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
