"""Sweep, export, retrain: a real Ray runtime, real OptunaSearch and ASHA, MLflow on SQLite, real images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow.pytorch
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    assert_ended_trials_keep_their_best_and_latest_checkpoints_only,
    optuna_trials,
    reported_epochs,
    run_module,
    small_sweep,
    sweep_args,
)
from mlflow.tracking import MlflowClient
from PIL import Image

from search import export, retrain, run
from search.sweep.checkpoints import ended_in_snapshot, newest_snapshot
from search.tracking.best import read_best
from spaces import get_space
from trainables.checkpoint import ModelSpec
from trainables.config import TrialConfig
from trainables.data import load_images
from trainables.loop import Normalizer, resolve_precision
from trainables.names import (
    ACCURACY_PNG,
    BEST_JSON,
    BEST_METRIC,
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    EPOCH,
    IMPORTANCE_JSON,
    IMPORTANCE_PNG,
    LEARNING_RATE,
    METRIC,
    MODEL_ARTIFACT,
    PARAMETERS,
    PER_CLASS_JSON,
    PER_CLASS_MD,
    PRECISION,
    REPORTED_METRICS,
    SOURCE_RUN_STATE_TAG,
    SPEC_FILE,
    SUMMARY_MD,
    TRIAL_TABLE_ARTIFACT,
)
from trainables.names import REPORT_ARTIFACTS as REPORT_FILES
from trainables.recipe import ASSIGNMENT, recipe_named

pytestmark = pytest.mark.slow

NUM_SAMPLES = 4
EPOCHS = 2


@pytest.fixture(scope="module")
def sweep(image_folder: Path, tmp_path_factory: pytest.TempPathFactory, ray_runtime) -> dict:
    workdir = tmp_path_factory.mktemp("sweep")
    settings = small_sweep(image_folder, workdir, num_samples=NUM_SAMPLES, epochs=EPOCHS, name="e2e")
    code = run.main(sweep_args(settings))
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name("cifar10-nesterov")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return {
        "code": code, "workdir": workdir, "uri": settings.tracking_uri, "client": client, "runs": runs,
        "settings": settings,
    }  # fmt: skip


def parent_and_children(sweep: dict):
    parents = [r for r in sweep["runs"] if r.data.tags.get("role") == "sweep"]
    children = [r for r in sweep["runs"] if r.data.tags.get("role") == "trial"]
    return parents, children


def test_the_sweep_exits_zero_with_one_parent_and_a_child_per_trial(sweep):
    parents, children = parent_and_children(sweep)
    assert sweep["code"] == 0
    assert len(parents) == 1 and len(children) == NUM_SAMPLES
    assert parents[0].info.status == "FINISHED"
    params = parents[0].data.params  # the defaults as the sweep resolved them, not None
    assert params["experiment"] == "cifar10-nesterov" and params["tracking_uri"] == sweep["uri"]
    assert all(child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for child in children)
    assert all(child.info.status == "FINISHED" for child in children)


def test_tunes_stored_snapshot_reads_as_every_trial_ended_and_each_kept_its_best_and_latest(sweep):
    # Checkpoints are pruned once this reader finds a trial's end in Tune's snapshot: should Tune's
    # format change, it would find none, and ended trials would keep every checkpoint until the end.
    folder = Path(sweep["settings"].sweep_location)
    trial_ids = {run.data.tags["trial_id"] for run in parent_and_children(sweep)[1]}
    assert ended_in_snapshot(newest_snapshot(folder)) == trial_ids
    assert_ended_trials_keep_their_best_and_latest_checkpoints_only(sweep["settings"])


def test_the_first_trial_is_the_assignments_point(sweep):
    first = optuna_trials(sweep["settings"])[0]  # Optuna's own first trial
    assert first.params == get_space("nesterov").first_point
    _, children = parent_and_children(sweep)
    configs = [TrialConfig.from_params(child.data.params) for child in children]
    assert TrialConfig() in configs  # the defaults are Part IV's settings


def epoch_end_accuracies(client: MlflowClient, run) -> dict[int, float]:
    """A trial's validation accuracy at each epoch's end (it also reports at ASHA's rungs inside
    an epoch), by epoch: where its checkpoints were taken."""
    epochs = {point.step: point.value for point in client.get_metric_history(run.info.run_id, EPOCH)}
    return {
        int(epochs[point.step]): point.value
        for point in client.get_metric_history(run.info.run_id, METRIC)
        if epochs[point.step] == int(epochs[point.step])
    }


def test_each_child_has_its_config_per_report_metrics_and_no_junk(sweep):
    _, children = parent_and_children(sweep)
    client = sweep["client"]
    for child in children:
        # The config, and nesterov's searched effective step, which the config holds only as lr.
        assert set(child.data.params) == {*TrialConfig().to_dict(), "effective_step", PRECISION, PARAMETERS}
        step = float(child.data.params["lr"]) / (1 - float(child.data.params["momentum"]))
        assert float(child.data.params["effective_step"]) == pytest.approx(step)
        assert child.data.params[PRECISION] == resolve_precision("auto", torch.device("cpu"))
        epochs = reported_epochs(sweep["uri"], child)
        assert epochs == sorted(epochs) and epochs[0] > 0 and epochs[-1] <= EPOCHS
        # Its steps count the images seen, so each report's step and epoch keep one ratio.
        steps = sorted(point.step for point in client.get_metric_history(child.info.run_id, METRIC))
        assert len({step / epoch for step, epoch in zip(steps, epochs, strict=True)}) == 1
        at_ends = epoch_end_accuracies(client, child)
        if at_ends:  # trained to an epoch's end: its best epoch is checkpointed
            assert set(child.data.metrics) == {*REPORTED_METRICS, BEST_METRIC}
            assert child.data.metrics[BEST_METRIC] == max(at_ends.values())
        else:  # stopped by ASHA inside its first epoch: no checkpoint, no best
            assert set(child.data.metrics) == set(REPORTED_METRICS)


def test_each_trial_follows_one_cycle_over_the_sweeps_epochs_up_to_the_configs_rate(sweep):
    parents, children = parent_and_children(sweep)
    assert parents[0].data.params["recipe_name"] == "assignment"  # the default: the assignment's
    assert parents[0].data.params["recipe_schedule"] == "onecycle"  # training, over one cycle
    client = sweep["client"]
    finished = 0
    for child in children:
        config_lr = float(child.data.params["lr"])
        history = client.get_metric_history(child.info.run_id, LEARNING_RATE)
        lrs = sorted(history, key=lambda point: point.step)
        assert lrs and all(0 < point.value <= config_lr for point in lrs)
        if reported_epochs(sweep["uri"], child)[-1] == EPOCHS:  # trained to the end: annealed by then
            finished += 1
            epoch_images = lrs[-1].step // EPOCHS  # a run's steps count the images seen
            steps = EPOCHS * math.ceil(epoch_images / TrialConfig.from_params(child.data.params).batch_size)
            expected = ASSIGNMENT.learning_rate(config_lr, steps - 1, steps)
            assert lrs[-1].value == pytest.approx(expected) and expected < config_lr / 2
    assert finished >= 1


def test_each_best_checkpoint_loads_in_plain_pytorch_and_rebuilds_the_model(sweep, tmp_path):
    _, children = parent_and_children(sweep)
    checkpointed = [child for child in children if BEST_METRIC in child.data.metrics]
    assert checkpointed
    for child in checkpointed:
        local = Path(
            sweep["client"].download_artifacts(child.info.run_id, CHECKPOINT_ARTIFACT, str(tmp_path))
        )
        state = torch.load(local / CHECKPOINT_FILE, weights_only=True)
        spec = ModelSpec.from_dict(json.loads((local / SPEC_FILE).read_text()))
        model = spec.build()
        model.load_state_dict(state["model"])
        assert model(torch.zeros(1, *spec.input_shape)).shape == (1, 3)
        at_ends = epoch_end_accuracies(sweep["client"], child)
        assert state["epoch"] == max(at_ends, key=lambda epoch: (at_ends[epoch], -epoch))


def ranked(sweep: dict) -> list:
    """The trials that reached an epoch's end: only those have a checkpoint, and so a best."""
    _, children = parent_and_children(sweep)
    for child in children:
        assert (BEST_METRIC in child.data.metrics) == (max(reported_epochs(sweep["uri"], child)) >= 1)
    return [child for child in children if BEST_METRIC in child.data.metrics]


def test_the_parent_holds_the_best_result_and_the_trial_table(sweep, tmp_path):
    parents, _ = parent_and_children(sweep)
    parent = parents[0]
    assert parent.data.metrics[BEST_METRIC] == max(c.data.metrics[BEST_METRIC] for c in ranked(sweep))
    table_path = sweep["client"].download_artifacts(parent.info.run_id, TRIAL_TABLE_ARTIFACT, str(tmp_path))
    table = pq.read_table(table_path)
    assert table.num_rows == NUM_SAMPLES
    assert set(table.column("status").to_pylist()) == {"FINISHED"}


def test_the_parent_explains_the_sweep_with_importance_plots_summary_and_best_config(sweep, tmp_path):
    parents, _ = parent_and_children(sweep)
    client, parent_id = sweep["client"], parents[0].info.run_id
    assert {item.path for item in client.list_artifacts(parent_id)} >= set(REPORT_FILES)
    folder = Path(client.download_artifacts(parent_id, "", str(tmp_path / "report")))

    importance = json.loads((folder / IMPORTANCE_JSON).read_text())
    searched = set(get_space("nesterov").first_point)  # every parameter the space searches
    assert importance["trials"] == NUM_SAMPLES and set(importance["params"]) == searched
    assert set(importance["evaluators"]) == {"fanova", "ped_anova"}
    for values in importance["evaluators"].values():
        assert set(values) == searched and math.isclose(sum(values.values()), 1.0, rel_tol=1e-6)

    for png in (IMPORTANCE_PNG, ACCURACY_PNG, CURVES_PNG):
        with Image.open(folder / png) as image:  # real images, of a readable size
            assert image.format == "PNG" and image.width >= 500 and image.height >= 300

    summary = (folder / SUMMARY_MD).read_text()
    best = max(ranked(sweep), key=lambda run: run.data.metrics[BEST_METRIC])
    assert f"{best.data.metrics[BEST_METRIC]:.4f}" in summary and "## Hyperparameter importance" in summary

    exported = tmp_path / "exported.json"
    export.main(["--experiment", "cifar10-nesterov", "--tracking-uri", sweep["uri"], "--out", str(exported)])
    assert (folder / BEST_JSON).read_text() == exported.read_text()  # the very file export writes


def export_best(sweep: dict, folder: Path, *extra: str) -> Path:
    best_path = folder / "best.json"
    args = ["--experiment", "cifar10-nesterov", "--tracking-uri", sweep["uri"], "--out", str(best_path)]
    assert export.main(args + list(extra)) == 0
    return best_path


def test_export_writes_the_winning_trial_and_every_trial(sweep, tmp_path):
    best_path = export_best(sweep, tmp_path, "--trials", str(tmp_path / "trials.parquet"))
    best = json.loads(best_path.read_text())
    children = ranked(sweep)
    top = max(run.data.metrics[BEST_METRIC] for run in children)
    winner = min((r for r in children if r.data.metrics[BEST_METRIC] == top), key=lambda r: r.info.start_time)
    assert best["schema_version"] == 2 and best["space"] == "nesterov" and best["sweep"] == "e2e"
    assert best[METRIC] == winner.data.metrics[BEST_METRIC]
    assert best["mlflow"]["run_id"] == winner.info.run_id
    assert best["mlflow"]["checkpoint_uri"] == f"runs:/{winner.info.run_id}/{CHECKPOINT_ARTIFACT}"
    assert best["model"]["model"] == "sequential" and best["optimizer"]["optimizer"] == "nesterov"
    assert len(best["data"]["normalization"]["mean"]) == 3 and best["training"]["epochs"] == EPOCHS
    assert best["training"]["recipe"] == ASSIGNMENT.to_record()  # how the sweep trained it, for a retrain
    assert pq.read_table(tmp_path / "trials.parquet").num_rows == NUM_SAMPLES


RETRAIN_EPOCHS = 2
HOLDOUT = 15  # of the 90 images: 75 to train on, two steps an epoch


@pytest.mark.parametrize(
    ("style", "optimizer", "recipe"),
    [("barebones", "sgd", None), ("module", "sgd", "long"), ("sequential", "nesterov", "long")],
)
def test_each_model_style_retrains_into_a_tested_model_that_loads_and_scores_the_same(
    sweep, tmp_path, style, optimizer, recipe
):
    best_path = export_best(sweep, tmp_path)
    edited = json.loads(best_path.read_text())
    edited["model"]["model"], edited["optimizer"]["optimizer"] = style, optimizer
    best_path.write_text(json.dumps(edited))
    metrics_path, name = tmp_path / "metrics.json", f"e2e-{style}"
    code = retrain.main(
        [str(best_path), "--epochs", str(RETRAIN_EPOCHS), "--holdout", str(HOLDOUT)]
        + ([] if recipe is None else ["--recipe", recipe])
        + ["--precision", "fp32", "--register", name, "--out", str(metrics_path)]
    )
    assert code == 0
    metrics = json.loads(metrics_path.read_text())
    client = sweep["client"]
    retrained = client.get_run(metrics["run_id"])
    assert retrained.data.tags["source_run_id"] == edited["mlflow"]["run_id"]
    assert retrained.data.params["model"] == style and retrained.data.params["precision"] == "fp32"

    # One point per epoch: the training loss, the held-out accuracy, the learning rate at the epoch's end.
    for metric in ("train_loss", METRIC, "lr"):
        assert [m.step for m in client.get_metric_history(retrained.info.run_id, metric)] == [1, 2]
    lrs = [m.value for m in client.get_metric_history(retrained.info.run_id, "lr")]
    config_lr = edited["optimizer"]["lr"]
    if recipe is None:  # as the trials trained: one cycle up to the config's rate, decaying towards 0
        assert retrained.data.params["recipe_name"] == "assignment" and lrs[1] < lrs[0] <= config_lr
    else:  # the long run as calibrated for a config searched under another recipe: a higher peak
        peak = recipe_named("long", ASSIGNMENT).peak_lr(config_lr, edited["optimizer"]["momentum"])
        assert retrained.data.params["recipe_name"] == "long" and lrs[1] < lrs[0] <= peak
        assert retrained.data.params["recipe_augment"] == "True" and peak > config_lr

    low, high = metrics["test_acc_interval_95"]
    assert low <= metrics["test_acc"] <= high and retrained.data.metrics["test_acc"] == metrics["test_acc"]
    artifacts = {item.path for item in client.list_artifacts(retrained.info.run_id)}
    assert {BEST_JSON, CONFUSION_PNG, PER_CLASS_JSON, PER_CLASS_MD} <= artifacts
    # MLflow 3 keeps a logged model apart from the run's artifacts, tied to the run by its source.
    model = mlflow.models.get_model_info(metrics["model_uri"])
    assert model.run_id == retrained.info.run_id and model.name == MODEL_ARTIFACT
    assert model.signature is not None and model.saved_input_example_info is not None
    best = read_best(best_path)
    assert list(metrics["per_class_accuracy"]) == list(best.spec.classes)
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == retrained.info.run_id

    # The registered model, loaded as a user would, scores the test images as the retrain said.
    loaded = mlflow.pytorch.load_model(f"models:/{name}/{version.version}")
    test = load_images(best.data, "test")
    with torch.no_grad():
        scores = loaded(Normalizer(best.spec.mean, best.spec.std, torch.device("cpu"))(test.images))
    assert float((scores.argmax(dim=1) == test.labels).float().mean()) == pytest.approx(metrics["test_acc"])


def test_a_retrain_whose_source_run_was_deleted_says_so_and_records_it(sweep, tmp_path, capsys):
    best_path = export_best(sweep, tmp_path)
    best = json.loads(best_path.read_text())
    client = sweep["client"]
    client.delete_run(best["mlflow"]["run_id"])
    try:
        capsys.readouterr()
        assert retrain.main([str(best_path), "--epochs", "1", "--out", str(tmp_path / "m.json")]) == 0
        (note,) = [
            line for line in capsys.readouterr().err.splitlines() if line.startswith("note: the trial")
        ]
        assert best["mlflow"]["run_id"] in note and "is deleted" in note
        retrained = client.get_run(json.loads((tmp_path / "m.json").read_text())["run_id"])
        assert retrained.data.tags[SOURCE_RUN_STATE_TAG] == "deleted"
    finally:
        client.restore_run(best["mlflow"]["run_id"])


def test_a_retrain_on_other_classes_than_the_sweeps_says_so_and_builds_the_model_for_them(
    sweep, tmp_path, capsys
):
    best_path = export_best(sweep, tmp_path)
    edited = json.loads(best_path.read_text())
    classes = edited["model"]["classes"]
    edited["model"]["classes"] = [*classes, "elsewhere"]  # as if the sweep had seen one class more
    best_path.write_text(json.dumps(edited))
    capsys.readouterr()
    assert retrain.main([str(best_path), "--epochs", "1", "--out", str(tmp_path / "m.json")]) == 0
    (note,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: these images")]
    assert f"({len(classes)} classes of shape [3, 32, 32]) are not the sweep's ({len(classes) + 1} of" in note
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics["per_class_accuracy"]) == classes  # the model is built for the images it got


def test_a_retrain_that_diverges_under_the_recipe_names_the_knob_and_keeps_its_epochs(sweep, tmp_path):
    best_path = export_best(sweep, tmp_path)
    edited = json.loads(best_path.read_text())
    edited["optimizer"]["lr"] = 50.0  # a rate no model survives, peaked 4 times higher by the recipe
    best_path.write_text(json.dumps(edited))
    retrained = run_module(
        "search.retrain", str(best_path), "--epochs", "3", "--recipe", "long", "--max-effective-step", "1000",
        cwd=tmp_path,
    )  # fmt: skip
    assert retrained.returncode == 2
    lines = retrained.stderr.strip().splitlines()
    assert lines[0].startswith("note: retraining from scratch on ")  # what it adds, before training
    (line,) = lines[1:]  # then one line, no traceback
    assert line.startswith("search.retrain: error: training diverged in epoch ")
    assert "--peak-lr-factor" in line and "with their recipe (assignment: drop --recipe)" in line
    client = sweep["client"]
    experiment = client.get_experiment_by_name("cifar10-nesterov")
    (run,) = client.search_runs([experiment.experiment_id], "tags.role = 'retrain' and params.lr = '50.0'")
    assert run.info.status == "FAILED"
    diverged_in = int(line.split("epoch ")[1].split(" ")[0])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == diverged_in - 1  # all it logged
