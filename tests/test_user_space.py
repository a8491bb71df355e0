"""A user's own search space: a function in their file or module, with --range and --fix from the
command line, refused in one line where it cannot be swept, and part of what a sweep is."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import run_module
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.cli import EXIT_BAD_INPUT
from search.sweep.settings import SweepSettings
from spaces import load_space, parse_fix, parse_range
from trainables.errors import InputError

# What a user writes, outside the package: a decorated space, searching what the assignment's
# spaces never did (kernel_1, batch_size), and a plain function of an Optuna trial.
SPACE_FILE = '''
from spaces import register_space


@register_space(
    summary="the Module model: lr, a kernel, the batch, and the second conv's width",
    first_point={"lr": 1e-2, "kernel_1": 5, "batch_size": 64, "channel_2": 16},
)
def wide(trial):
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    trial.suggest_categorical("kernel_1", [3, 5])
    trial.suggest_categorical("batch_size", [32, 64])
    trial.suggest_int("channel_2", 8, 32, log=True)
    return {"model": "module", "optimizer": "sgd", "momentum": 0.0, "channel_1": 8}


def plain(trial):
    """Plain SGD's learning rate on the Module model."""
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    return {"model": "module", "optimizer": "sgd", "momentum": 0.0}
'''


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "my_spaces.py"
    path.parent.mkdir()
    path.write_text(SPACE_FILE)
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_decorated_function_in_the_users_file_is_a_space(space_file):
    space = load_space(f"{space_file}:wide")
    assert (space.name, space.reference) == ("wide", f"{space_file}:wide")
    assert space.distributions() == {
        "lr": FloatDistribution(1e-3, 1e-1, log=True),
        "kernel_1": CategoricalDistribution([3, 5]),
        "batch_size": CategoricalDistribution([32, 64]),
        "channel_2": IntDistribution(8, 32, log=True),
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.first_point)
    first = space.config_for(study.ask())
    assert (first.model, first.kernel_1, first.batch_size, first.channel_1, first.channel_2) == (
        "module",
        5,
        64,
        8,
        16,
    )


def test_a_plain_function_is_a_space_summarized_by_its_docstring(space_file):
    space = load_space(f"{space_file}:plain")
    assert space.summary == "Plain SGD's learning rate on the Module model."
    assert (list(space.distributions()), space.first_point) == (["lr"], {})


def test_a_module_on_the_path_names_its_space_by_module_and_function(space_file, monkeypatch):
    package = space_file.parent / "team_spaces"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cifar.py").write_text(SPACE_FILE)
    monkeypatch.syspath_prepend(str(space_file.parent))
    assert (
        load_space("team_spaces.cifar:wide").distributions()
        == load_space(f"{space_file}:wide").distributions()
    )


def test_ranges_and_pins_from_the_command_line_change_what_is_searched(space_file):
    space = load_space(
        f"{space_file}:wide",
        (parse_range("channel_2=32:256:log"), parse_range("lr=0.02:0.05")),
        (parse_fix("batch_size=32"), parse_fix("channel_1=16")),
    )
    distributions = space.distributions()
    assert distributions["channel_2"] == IntDistribution(32, 256, log=True)
    assert distributions["lr"] == FloatDistribution(0.02, 0.05)
    assert "batch_size" not in distributions  # pinned: no longer searched
    # The first point moves into the new ranges, leaves what is pinned, and says so.
    assert space.first_point == {"lr": 0.02, "kernel_1": 5, "channel_2": 32}
    assert space.notes == (
        "first point: lr 0.01 clipped to 0.02, the edge of its --range",
        "first point: batch_size 64 left out, --fix sets it",
        "first point: channel_2 16 clipped to 32, the edge of its --range",
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        config = space.config_for(study.ask())
        assert (config.batch_size, config.channel_1) == (32, 16)  # a pinned parameter, a pinned constant
        assert 32 <= config.channel_2 <= 256 and 0.02 <= config.lr <= 0.05
    # A whole number pinned as 16.0 is the int 16, as the space would have suggested it.
    (pin,) = load_space(f"{space_file}:wide", (), (("channel_2", 16.0),)).fixed
    assert pin == ("channel_2", 16) and isinstance(pin[1], int)


def test_a_space_travels_to_another_process_as_its_reference_and_overrides(space_file):
    """Tune pickles the searcher and callbacks with the sweep; a resume loads them again."""
    space = load_space(
        f"{space_file}:wide", (parse_range("channel_2=32:256:log"),), (parse_fix("batch_size=32"),)
    )
    again = pickle.loads(pickle.dumps(space))
    assert again is space  # the same load, cached
    load_space.cache_clear()  # as in a fresh process
    again = pickle.loads(pickle.dumps(space))
    assert again.distributions() == space.distributions() and again.first_point == space.first_point


@pytest.mark.parametrize(
    ("file_text", "extra", "message"),
    [
        (None, ["--space", "no/such/spaces.py:wide"], "no space file "),
        (SPACE_FILE, ["--space", "{file}:narrow"], "has no function 'narrow' (its spaces: wide)"),
        ("def wide(trial):\n    return {'lr': 1e-2\n", ["--space", "{file}:wide"], "{file}:2: syntax error"),
        (
            "import no_such_package\n",
            ["--space", "{file}:wide"],
            "{file}:1: importing it failed: ModuleNotFoundError",
        ),
        (
            "def wide(trial):\n    trial.suggest_int('chanel_2', 8, 64)\n    return {}\n",
            ["--space", "{file}:wide"],
            "space wide suggests 'chanel_2', which the trial config does not know",
        ),
        (
            "def wide(trial):\n    trial.suggest_int('kernel_1', 2, 4)\n    return {}\n",
            ["--space", "{file}:wide"],
            "space wide returns a config that fails validation: kernel_1 must be odd and >= 1, got 2",
        ),
        (
            "def wide(trial):\n    return {'optimizer': 'adam'}\n",
            ["--space", "{file}:wide"],
            "space wide returns a config that fails validation: optimizer must be one of sgd, nesterov",
        ),
        (
            None,
            ["--space", "nesterov", "--range", "channel_2=64:64"],
            "--range channel_2=64:64: LOW must be below HIGH",
        ),
        (
            None,
            ["--space", "nesterov", "--range", "channel_2=128:16"],
            "--range channel_2=128:16: LOW must be below HIGH",
        ),
        (
            None,
            ["--space", "nesterov", "--range", "lr=0:0.1:log"],
            "--range lr=0:0.1:log: a log range needs LOW > 0",
        ),
        (None, ["--space", "nesterov", "--range", "lr=1e-3"], "--range lr=1e-3: expected NAME=LOW:HIGH"),
        (
            None,
            ["--space", "nesterov", "--range", "kernel_1=3:7"],
            "--range kernel_1=3:7: space nesterov does not search 'kernel_1' (it searches channel_1,",
        ),
        (
            None,
            ["--space", "nesterov", "--fix", "batch=32"],
            "--fix batch=32: space nesterov neither searches 'batch' nor sets it to a constant",
        ),
        (None, ["--space", "nesterov", "--range", "channel_2=16.5:64"], "channel_2 is a whole number"),
        (
            None,
            ["--space", "nesterov", "--range", "channel_1=0:128"],
            "space nesterov returns a config that fails validation: channel_1 must be >= 1, got 0",
        ),  # at an end of the new range: refused now, not once trials sample there
        (None, ["--space", "nesterov", "--fix", "momentum=inf"], "--fix momentum=inf: VALUE must be finite"),
        (
            SPACE_FILE,
            ["--space", "{file}:plain", "--fix", "lr=0.01"],
            "space plain searches nothing once --fix pins lr",
        ),
    ],
)
def test_a_space_that_cannot_be_swept_is_refused_in_one_line_before_anything_runs(
    file_text, extra, message, tmp_path
):
    file = tmp_path / "my_spaces.py"
    if file_text is not None:
        file.write_text(file_text)
    store = tmp_path / "mlflow.db"
    args = [arg.format(file=file) for arg in extra]
    result = run_module(
        "search.run", *args, "--tracking-uri", f"sqlite:///{store}", "--storage-path", str(tmp_path / "ray"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message.format(file=file) in line
    assert not store.exists() and not (tmp_path / "ray").exists()  # before MLflow or Ray heard of it


def test_show_prints_each_parameter_its_range_scale_and_origin(tmp_path):
    result = run_module(
        "search.run", "--space", "nesterov", "--range", "channel_2=16:256:log", "--fix", "momentum=0.9",
        "--show",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert "int 16..256, log" in lines["channel_2"] and "--range" in lines["channel_2"]
    assert "int 16..128, log" in lines["channel_1"] and "the space" in lines["channel_1"]
    assert "0.9" in lines["momentum"] and "--fix" in lines["momentum"]
    assert "first point: momentum 0.5 left out, --fix sets it" in result.stdout
    listed = run_module("search.run", "--list-spaces", cwd=tmp_path)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == [
        "barebones",
        "nesterov",
        "sgd",
    ]


def test_a_resume_after_a_range_changed_is_refused_naming_the_parameter(space_file, tmp_path):
    first = SweepSettings(
        space=f"{space_file}:wide",
        ranges=(parse_range("channel_2=8:64:log"),),
        storage_path=str(tmp_path),
        name="w",
    )
    first.identity_file.write_text_atomically(json.dumps(first.identity()))
    again = SweepSettings(**{**vars(first), "resume": True})
    again.check_resumes_the_same_sweep()  # the same space and range: allowed
    wider = SweepSettings(**{**vars(again), "ranges": (parse_range("channel_2=8:256:log"),)})
    with pytest.raises(
        InputError, match=r"its space changed: channel_2 was int 8\.\.64, log, now int 8\.\.256, log"
    ):
        wider.check_resumes_the_same_sweep()
    space_file.write_text(
        SPACE_FILE.replace('"momentum": 0.0, "channel_1": 8', '"momentum": 0.0, "channel_1": 16')
    )
    load_space.cache_clear()  # the file edited, as between two runs of search.run
    with pytest.raises(InputError, match="its space changed: channel_1 was 8, now 16"):
        again.check_resumes_the_same_sweep()
