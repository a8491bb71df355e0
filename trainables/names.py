"""Every name a metric, a tag or an artifact is known by, defined once.

Trials report metrics under these names, the MLflow writer logs and tags runs
with them, and export, the report and retrain read them back. Plain strings, no
imports: any module can use them without loading torch, Ray or MLflow.
"""

from __future__ import annotations

METRIC = "val_acc"  # the validation accuracy every sweep maximizes
MODE = "max"

# What a trial reports at each epoch, and what the MLflow writer logs of it.
EPOCH = "epoch"  # how far a trial has trained, in epochs: fractional between epochs
IMAGES_SEEN = "images_seen"  # the same in images: the step of a trial's metrics, the unit of ASHA's rungs
VAL_LOSS = "val_loss"
TRAIN_LOSS = "train_loss"
TRAIN_ACC = "train_acc"
TRAIN_IMAGES_PER_S = "train_images_per_s"
EPOCH_TIME_S = "epoch_time_s"  # training plus validation since the last report: a trial's real work
DIVERGED = "diverged"  # 1.0 when the loss stopped being finite; also a tag, "true"
TRAIN_TFLOP = "train_tflop"  # a trial's cost so far: its training's floating-point operations
TRIAL_SECONDS = "trial_seconds"  # and its training and validation time
LEARNING_RATE = "lr"  # at the last step before a report (a trial's) or an epoch's end (a retrain's)
REPORTED_METRICS = (
    METRIC,
    VAL_LOSS,
    TRAIN_LOSS,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_S,
    EPOCH_TIME_S,
    EPOCH,
    DIVERGED,
    TRAIN_TFLOP,
    TRIAL_SECONDS,
    LEARNING_RATE,
)
PRECISION = "precision"  # fp32 or bf16, as a trial resolved it on its device: logged as a param
PARAMETERS = "parameters"  # the model's weights and biases, counted: logged as a param
RUN_PARAMS = (PRECISION, PARAMETERS)  # what a trial reports once, for its run's params
BEST_METRIC = f"best_{METRIC}"  # a trial's best epoch, the one whose checkpoint is logged
TEST_ACC = "test_acc"  # a retrain's, on the test images; with _low and _high, its 95% interval
TEST_LOSS = "test_loss"

# Tags that tie runs to sweeps, trials and each other.
ROLE_TAG = "role"  # one of the roles below
SWEEP_ROLE, TRIAL_ROLE, RETRAIN_ROLE = "sweep", "trial", "retrain"
SWEEP_TAG = "sweep"
SWEEP_HOST_PARAM = "sweep_host"  # a parent run's: the machine that started it
SWEEP_LOCATION_PARAM = "sweep_location"  # a parent run's: where its Tune state is, resolved
SPACE_TAG = "space"  # a parent run's: what --space named, resolved
SEARCHED_TAG = "searched"  # a parent run's: the parameters its space searched, sorted, comma-joined
TRIAL_ID_TAG = "trial_id"
ERROR_TAG = "error"  # the end of the traceback of a trial's last crash
RETRIES_TAG = "retries"
RESUMED_AT_TAG = "resumed_at_epoch"  # the epoch of a resumed trial's first report
BEST_RUN_ID_TAG = "best_run_id"
BEST_TRIAL_ID_TAG = "best_trial_id"
SOURCE_RUN_ID_TAG = "source_run_id"  # on a retrain run: the trial it retrained
ORPHAN_TAG = "orphan"  # on a run closed FAILED as no part of its sweep (never began, trial lost): why
WAITING_UPLOADS_TAG = "waiting_uploads"  # on a parent run closed FAILED while uploads wait: what, where
SOURCE_RUN_STATE_TAG = "source_run_state"  # on a retrain run whose trial was deleted: deleted, or missing

# Artifacts, and the files of a checkpoint.
CHECKPOINT_ARTIFACT = "checkpoint"  # folder of a trial's best checkpoint
CHECKPOINT_FILE = "checkpoint.pt"  # tensors only
SPEC_FILE = "model.json"  # what rebuilds the model
MODEL_ARTIFACT = "model"  # a retrained model, in MLflow's pytorch flavor
SWEEP_SETTINGS_ARTIFACT = "sweep.json"  # the parent's settings with their types, for export
SPACE_ARTIFACT = "space.json"  # the parent's space, resolved: each range and where it came from
TRIAL_TABLE_ARTIFACT = "trials.parquet"
IMPORTANCE_JSON = "importance.json"
IMPORTANCE_PNG = "importance.png"
ACCURACY_PNG = "accuracy_by_hyperparameter.png"
CURVES_PNG = "learning_curves.png"
SUMMARY_MD = "summary.md"
LAST_WORDS_TXT = "last_words.txt"  # what search.run printed as the sweep ended: summary, resume command
BEST_JSON = "best.json"
PER_CLASS_JSON = "per_class_accuracy.json"  # a retrain's test accuracy, class by class
PER_CLASS_MD = "per_class_accuracy.md"
CONFUSION_PNG = "confusion_matrix.png"
REPORT_ARTIFACTS = (
    IMPORTANCE_JSON,
    IMPORTANCE_PNG,
    ACCURACY_PNG,
    CURVES_PNG,
    TRIAL_TABLE_ARTIFACT,
    SUMMARY_MD,
    BEST_JSON,
)
