"""A sweep at a final model's budget: the long recipe, rungs inside the first epoch, and the search's
best trained to the end as the sweep's final trial, then registered with no retrain. A real Ray
runtime, Optuna's GP sampler, MLflow on SQLite, real image files."""

from __future__ import annotations

import json

import mlflow.pytorch
import pytest
import torch
from conftest import (
    optuna_trials,
    reported_epochs,
    run_module,
    small_sweep,
    sweep_args,
    sweep_parent,
    trial_runs,
    write_image_folder,
)
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from search import export, retrain, run
from search.tracking.best import read_best
from trainables.config import FINAL_OF, DataSettings, TrialConfig
from trainables.data import load_images
from trainables.loop import Normalizer
from trainables.model import training_flops_per_image
from trainables.names import LEARNING_RATE, METRIC, TEST_ACC, TRAIN_TFLOP, TRIAL_ID_TAG
from trainables.recipe import LONG

pytestmark = pytest.mark.slow

EPOCHS = 3  # the final budget; its rungs, a ninth and a third of the first epoch, lie inside it
NUM_SAMPLES = 6  # five trials of the search, then the final one


@pytest.fixture(scope="module")
def final_sweep(tmp_path_factory: pytest.TempPathFactory, ray_runtime) -> dict:
    workdir = tmp_path_factory.mktemp("final")
    # 200 images a class: the rungs fall a few batches apart.
    images = write_image_folder(workdir / "images", per_class=200, test_per_class=20)
    data = DataSettings(source=str(images), root=str(workdir / "cache"), val_size=30)
    settings = small_sweep(
        images, workdir, data=data, epochs=EPOCHS, num_samples=NUM_SAMPLES, recipe=LONG, top_rung="best"
    )
    args = sweep_args(settings)
    assert run.main(args) == 0
    client = MlflowClient(settings.tracking_uri)
    return {"settings": settings, "args": args, "client": client, "runs": trial_runs(settings),
            "parent": sweep_parent(settings), "workdir": workdir}  # fmt: skip


def test_the_search_stops_inside_the_first_epoch_and_only_its_best_trains_to_the_end(final_sweep):
    settings, runs = final_sweep["settings"], final_sweep["runs"]
    assert final_sweep["parent"].data.params["recipe_name"] == "long"
    assert final_sweep["parent"].data.params["top_rung"] == "best"
    assert settings.rung_fractions == (1 / 27, 1 / 9)  # of all 3 epochs: a ninth, a third of the first
    (final,) = [run for run in runs if FINAL_OF in run.data.params]
    search = [run for run in runs if FINAL_OF not in run.data.params]
    assert len(runs) == NUM_SAMPLES and len(search) == NUM_SAMPLES - 1
    for trial in search:  # every trial of the search ended inside the first epoch
        assert reported_epochs(settings.tracking_uri, trial)[-1] < 1
    assert reported_epochs(settings.tracking_uri, final) == [1.0, 2.0, 3.0]  # epoch ends only
    assert final.info.run_name.split()[1] == "final"

    # The final trial is the incumbent: the search's best score at its top rung, its config again.
    def top_score(trial) -> tuple[float, float]:
        history = final_sweep["client"].get_metric_history(trial.info.run_id, METRIC)
        last = max(history, key=lambda point: point.step)
        return last.step, last.value

    reached = max(top_score(trial)[0] for trial in search)
    at_top = [trial for trial in search if top_score(trial)[0] == reached]
    incumbent = max(at_top, key=lambda trial: (top_score(trial)[1], -trial.info.start_time))
    assert final.data.params[FINAL_OF] == incumbent.data.tags[TRIAL_ID_TAG]
    config = {name: incumbent.data.params[name] for name in TrialConfig().to_dict()}
    assert {name: final.data.params[name] for name in config} == config


def test_a_search_trial_is_scored_after_a_decay_and_pays_for_it(final_sweep):
    """At a rung, a decay branches off and is scored: the trial's cost counts its images."""
    client = final_sweep["client"]
    for trial in final_sweep["runs"]:
        if FINAL_OF in trial.data.params:
            continue
        config = TrialConfig.from_params(trial.data.params)
        seen = max(point.step for point in client.get_metric_history(trial.info.run_id, METRIC))  # images
        flops = training_flops_per_image(config, (3, 32, 32), 3)
        assert trial.data.metrics[TRAIN_TFLOP] > flops * seen / 1e12  # the decays' images too


def test_optuna_hears_the_search_complete_at_its_top_rung_and_not_the_final_trial(final_sweep):
    trials = optuna_trials(final_sweep["settings"])
    assert len(trials) == NUM_SAMPLES - 1
    assert {trial.state for trial in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert any(trial.state == TrialState.COMPLETE for trial in trials)  # GP models those


def test_the_final_trial_is_the_sweeps_best_and_registers_as_a_tested_model_that_reproduces(
    final_sweep, tmp_path
):
    settings, client = final_sweep["settings"], final_sweep["client"]
    (final,) = [run for run in final_sweep["runs"] if FINAL_OF in run.data.params]
    best_path = tmp_path / "best.json"
    args = [
        "--experiment",
        "cifar10-nesterov",
        "--tracking-uri",
        settings.tracking_uri,
        "--sweep",
        settings.sweep_name,
    ]
    assert export.main([*args, "--out", str(best_path), "--register", "final-model"]) == 0
    best = read_best(best_path)
    assert best.run_id == final.info.run_id and best.recipe == LONG and best.epochs == EPOCHS

    (version,) = client.search_model_versions("name = 'final-model'")
    assert version.run_id == final.info.run_id  # a model of the trial's own run, which is left as it was
    assert client.get_run(final.info.run_id).info.status == "FINISHED"
    logged_accuracy = float(version.tags[TEST_ACC])
    assert (
        float(version.tags[f"{TEST_ACC}_low"]) <= logged_accuracy <= float(version.tags[f"{TEST_ACC}_high"])
    )
    model_info = mlflow.models.get_model_info(version.source)
    assert model_info.signature is not None and model_info.saved_input_example_info is not None

    # Loaded as a user would, it scores the test images as registered.
    loaded = mlflow.pytorch.load_model(f"models:/final-model/{version.version}")
    test = load_images(best.data, "test")
    with torch.no_grad():
        scores = loaded(Normalizer(best.spec.mean, best.spec.std, torch.device("cpu"))(test.images))
    accuracy = float((scores.argmax(dim=1) == test.labels).float().mean())
    assert f"{accuracy:.4f}" == version.tags[TEST_ACC] and logged_accuracy == pytest.approx(
        accuracy, abs=5e-5
    )


def test_a_retrain_of_its_best_trains_with_the_recorded_recipe(final_sweep, tmp_path, capsys):
    settings, client = final_sweep["settings"], final_sweep["client"]
    best_path = tmp_path / "best.json"
    args = [
        "--experiment",
        "cifar10-nesterov",
        "--tracking-uri",
        settings.tracking_uri,
        "--sweep",
        settings.sweep_name,
    ]
    assert export.main([*args, "--out", str(best_path)]) == 0
    capsys.readouterr()
    metrics_path = tmp_path / "metrics.json"
    assert retrain.main([str(best_path), "--precision", "fp32", "--out", str(metrics_path)]) == 0
    (note,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert "registers it with no retrain" in note  # the same recipe and epochs: it says what it adds
    retrained = client.get_run(json.loads(metrics_path.read_text())["run_id"])
    recorded = json.loads(best_path.read_text())["training"]["recipe"]
    assert {
        f"recipe_{part}": str(value) for part, value in recorded.items()
    }.items() <= retrained.data.params.items()
    # wsd to the searched peak, the config's own rate: warmed up by epoch 1, decaying by the last.
    lrs = [
        point.value
        for point in sorted(
            client.get_metric_history(retrained.info.run_id, LEARNING_RATE), key=lambda p: p.step
        )
    ]
    config_lr = json.loads(best_path.read_text())["optimizer"]["lr"]
    assert lrs[0] == pytest.approx(config_lr) and lrs[-1] <= config_lr / 5


def test_a_resume_with_another_recipe_is_refused_in_one_line(final_sweep):
    result = run_module("search.run", *final_sweep["args"], "--resume", "--recipe", "assignment",
                        cwd=final_sweep["workdir"])  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"search.run: error: --resume cannot change what sweep {final_sweep['settings'].sweep_name} is: its "
        "--recipe was 'long', now 'assignment' (start a new sweep with another --name instead)"
    )
