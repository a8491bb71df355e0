"""Earlier sweeps' finished trials, read back from MLflow, for a new sweep to start from (warm start).

Only trials that are comparable: same experiment and space, the same images and
split, the same fidelity (epochs, rungs) and recipe, trained to the end. Their configs and
final validation accuracies; whether each fits the space's current ranges is the
searcher's question.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from search.tracking.store import ImageDataset, child_runs, is_diverged, searched_tag
from spaces import SearchSpace
from trainables.config import FINAL_OF, TrialConfig
from trainables.names import EPOCH, METRIC, ROLE_TAG, SEARCHED_TAG, SPACE_TAG, SWEEP_ROLE, SWEEP_TAG
from trainables.recipe import Recipe

# The parent-run params that must match for two sweeps' trials to be comparable.
COMPARABLE_PARAMS = (
    "data_source", "data_val_size", "data_max_train_images", "data_seed", "epochs", "scheduler", "rungs",
    "reduction_factor", "top_rung",
)  # fmt: skip


@dataclass(frozen=True)
class PastTrial:
    sweep: str
    config: TrialConfig
    value: float  # the final validation accuracy; 0.0 for a trial that diverged


def finished_trials(
    client: MlflowClient,
    experiment_id: str,
    space: SearchSpace,
    sweep: str,
    params: Mapping[str, Any],
    train_images: ImageDataset,  # what this sweep trains on: comparable sweeps trained on the same
    complete_at: float,  # the epochs after which a trial of the search has trained to its end
) -> list[PastTrial]:
    """The trials of the experiment's other sweeps that searched the same parameters (whatever the
    space was named) or named this space, comparable to this sweep's, that
    trained to the search's end, oldest sweep first. Comparable: the same settings, recipe and
    training images (the digest of the parent's dataset input, which changes with the files and
    the split). A final trial (--top-rung best) is not one: it trained past the search, at another
    fidelity."""
    sweeps = f"tags.{ROLE_TAG} = '{SWEEP_ROLE}'"
    queries = [f"tags.{SEARCHED_TAG} = '{searched_tag(space)}'"]
    if "'" not in space.reference:  # a quote in a file's path would end MLflow's filter string
        queries.append(f"tags.{SPACE_TAG} = '{space.reference}'")
    found = {  # MLflow's filters have no OR: one search for each, by run ID
        parent.info.run_id: parent
        for query in queries
        for parent in client.search_runs([experiment_id], f"{sweeps} and {query}")
    }
    parents = sorted(found.values(), key=lambda parent: parent.info.start_time)
    wanted = {name: str(params[name]) for name in COMPARABLE_PARAMS}
    recipe = Recipe.from_params(params)
    trials = []
    for parent in parents:
        if parent.data.tags.get(SWEEP_TAG) == sweep:
            continue
        recorded = {"top_rung": "asha", **parent.data.params}  # older sweeps lack it
        if any(recorded.get(name) != value for name, value in wanted.items()):
            continue
        if Recipe.from_params(recorded) != recipe:  # an older sweep's: from the schedule it recorded
            continue
        if train_images.digest not in {inputs.dataset.digest for inputs in parent.inputs.dataset_inputs}:
            continue  # the same folder, other images
        for run in child_runs(client, parent):
            if run.info.status != "FINISHED" or METRIC not in run.data.metrics or FINAL_OF in run.data.params:
                continue
            trained_through = run.data.metrics.get(EPOCH, 0)
            if not is_diverged(run) and trained_through < complete_at - 1e-9:
                continue  # stopped at a lower rung: not a final score
            value = 0.0 if is_diverged(run) else run.data.metrics[METRIC]
            trials.append(
                PastTrial(parent.data.tags[SWEEP_TAG], TrialConfig.from_params(run.data.params), value)
            )
    return trials
