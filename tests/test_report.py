"""The sweep report's learning curves speak the sweep's language: run numbers and images seen."""

from __future__ import annotations

import matplotlib.pyplot as plt
import optuna
import optuna.visualization.matplotlib as optuna_plots
import pytest
from optuna.distributions import FloatDistribution

from search.tracking.report import label_curves


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # Optuna's matplotlib plots
def test_the_learning_curves_are_named_by_run_number_against_images_seen():
    lr = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
    study = optuna.create_study(direction="maximize")
    for run_name, values in [("004 lr=0.01", {100: 0.3, 300: 0.5}), ("001 lr=0.003", {100: 0.2})]:
        trial = optuna.trial.create_trial(
            params={"lr": 0.01}, distributions=lr, value=values[100], intermediate_values=values,
            user_attrs={"run_name": run_name},
        )  # fmt: skip
        study.add_trial(trial)
    axes = label_curves(optuna_plots.plot_intermediate_values(study), study)
    assert [line.get_label() for line in axes.get_lines()] == ["004", "001"]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["004", "001"]
    assert axes.get_xlabel() == "images seen" and axes.get_ylabel() == "val_acc"
    plt.close(axes.figure)
