"""The train tasks build their runs from the recipe files, exactly as `diffkt3d train` does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from diffkt3d.cli.main import build_parser
from diffkt3d.cli.train import train_config_from_args
from diffkt3d.errors import ConfigError
from diffkt3d.training.config import TrainConfig
from diffkt3d.training.recipe import DATA_ROOT_ENV, load_scardnft_recipe, read_recipe
from train_tasks.any2any import RECIPE, SERVER_DECIDED, Any2AnyTrainTask, train_config_from_request

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "datasets"
    for split in ("train", "validation"):
        (root / "openkbp" / split).mkdir(parents=True)
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    return root


def _server(request: dict, tmp_path: Path, base_model: Path | None = None) -> TrainConfig:
    cases = [str(tmp_path / "datasets" / "openkbp" / "train")]
    scratch = {} if base_model else {"from_scratch": True}
    return train_config_from_request({"model": "any2any", "gpus": "all", **scratch, **request}, cases,
                                     tmp_path / "run", tmp_path / "cache", base_model=base_model)


def _cli(args: list[str], data_root: Path) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(
        ["train", "configs/cpu-default.yaml", "--data-root", str(data_root), *args]))


@pytest.mark.parametrize("request_body,cli_args", [
    ({}, []),
    ({"stages.dose.steps": 40, "stages.any2any.lr": 3e-4, "seed": 3, "grid": 32},
     ["--set", "stages.dose.steps=40", "--set", "stages.any2any.lr=3e-4", "--set", "seed=3", "--set", "grid=32"]),
])
def test_server_and_command_line_build_the_same_run(data_root: Path, tmp_path: Path, monkeypatch, request_body,
                                                     cli_args) -> None:
    """Field by field the same TrainConfig, apart from the fields the server decides (its data, its
    run folder, no validation split during the run); from scratch, as the command line trains."""
    monkeypatch.chdir(REPO)
    server, cli = _server(request_body, tmp_path), _cli(cli_args, data_root)
    assert type(server) is type(cli) is TrainConfig
    differ = {f.name for f in dataclasses.fields(TrainConfig) if getattr(server, f.name) != getattr(cli, f.name)}
    assert differ <= set(SERVER_DECIDED), differ
    for field in dataclasses.fields(TrainConfig):
        if field.name not in SERVER_DECIDED:
            assert getattr(server, field.name) == getattr(cli, field.name), field.name
    assert server.train_roots == [str(tmp_path / "datasets/openkbp/train")] and server.val_roots == []
    assert cli.val_roots == [str(data_root / "openkbp/validation")]


def test_by_default_the_server_fine_tunes_the_served_model(data_root: Path, tmp_path: Path) -> None:
    served = tmp_path / "served.pt"
    cfg = _server({"stages.dose.steps": 5, "validation.rule.min_cases": 1}, tmp_path, base_model=served)
    assert cfg.init_from == str(served) and cfg.stages[1].steps == 5 and cfg.stages[1].loss_norm == "l1"
    # fields that describe a new model need the explicit from_scratch; without a served model too
    for request in ({"grid": 32}, {"model_preset": "tiny"}, {"model_overrides.depth": 2}):
        with pytest.raises(ConfigError, match="from_scratch"):
            _server(request, tmp_path, base_model=served)
    with pytest.raises(ConfigError, match="no served model to fine-tune"):
        train_config_from_request({}, [], tmp_path / "run", tmp_path / "cache", base_model=None)
    with pytest.raises(ConfigError, match="from_scratch must be true or false"):
        _server({"from_scratch": "yes"}, tmp_path, base_model=served)
    assert _server({"grid": 32}, tmp_path).init_from is None


def test_validation_keys_are_checked_against_their_file(tmp_path: Path) -> None:
    from train_tasks.any2any import PARAM_NAMES, check_request

    assert {"validation.rule.min_cases", "validation.case_ids", "validation", "from_scratch"} <= PARAM_NAMES
    check_request({"validation.rule.min_cases": 1, "validation": {"steps": 2}})
    with pytest.raises(ConfigError, match=r"validation\.yaml.*min_cases must be an integer >= 1|min_cases must"):
        check_request({"validation.rule.min_cases": 0})
    with pytest.raises(ConfigError, match="unknown override 'stepz'"):
        check_request({"validation.stepz": 2})
    with pytest.raises(ConfigError) as err:
        check_request({"validation.steps": "ten"})
    assert "validation.yaml" in str(err.value) and str(REPO) not in str(err.value)


def test_a_request_for_fewer_steps_keeps_the_recipes_stage_settings(data_root: Path, tmp_path: Path) -> None:
    cfg = _server({"stages.dose.steps": 5, "stages.A.steps": 3}, tmp_path)
    any2any, dose = cfg.stages
    assert (any2any.steps, dose.steps) == (3, 5)
    assert (dose.loss_norm, dose.loss_region, dose.decay_fraction, dose.max_cpu_minutes) == ("l1", "body", 0.4, 67)
    assert (any2any.max_cpu_minutes, any2any.lr, cfg.loss_space) == (13, 6e-4, "x0")
    assert cfg.log_every == 3  # the shortest stage still logs


def test_unknown_request_keys_are_refused_and_server_paths_ignored(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _server({"any2any_steps": 2}, tmp_path)
    assert "unknown override 'any2any_steps'" in str(err.value) and "'stages'" in str(err.value)
    cfg = _server({"train_roots": ["/etc"], "out_dir": "/tmp/elsewhere"}, tmp_path)
    assert cfg.train_roots == [str(tmp_path / "datasets/openkbp/train")] and cfg.out_dir == str(tmp_path / "run")


def test_task_config_lists_the_recipes_fields(tmp_path: Path) -> None:
    from diffkt3d.models.registry import ModelRegistry

    config = Any2AnyTrainTask(tmp_path / "model", ModelRegistry(tmp_path / "reg", None), lambda: None).config()
    assert config["stages.dose.loss_norm"] == "l1" and config["stages.any2any.max_cpu_minutes"] == 13
    assert config["from_scratch"] is False and config["validation.rule.min_cases"] == 3
    assert config["model_preset"] == "cpu-default" and config["gpus"] == "all"
    assert not {k for k in config if k.split(".")[0] in SERVER_DECIDED}
    assert RECIPE == REPO / "configs" / "cpu-default.yaml"


def test_scardnft_task_overrides_its_recipe(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    """The ScardNFT task's run is configs/scardnft-cpu.yaml with the request on top, as on the command
    line; the served model, the datastore cases and the preference store replace the recipe's."""
    from diffkt3d.preferences import PreferenceStore
    from train_tasks.scardnft import SERVER_DECIDED as SCARDNFT_DECIDED
    from train_tasks.scardnft import ScardNFTTrainTask, scardnft_config_from_request

    monkeypatch.chdir(REPO)
    request = {"model": "scardnft", "iterations": 3, "reward.w_mae": 2.0, "base_model": "/etc/passwd"}
    cases = [str(data_root / "openkbp/train")]
    server = scardnft_config_from_request(request, cases, tmp_path / "served.pt", tmp_path / "run", tmp_path / "prefs")
    cli = load_scardnft_recipe("configs/scardnft-cpu.yaml", {"iterations": 3, "reward.w_mae": 2.0},
                               data_root=data_root)
    differ = {f.name for f in dataclasses.fields(server) if getattr(server, f.name) != getattr(cli, f.name)}
    assert differ <= set(SCARDNFT_DECIDED), differ
    assert server.base_model == str(tmp_path / "served.pt") and server.case_dirs == cases and not server.train_roots
    assert (server.iterations, server.reward.w_mae, server.max_cpu_minutes) == (3, 2.0, cli.max_cpu_minutes)
    with pytest.raises(ConfigError, match="unknown override 'iteratons'"):
        scardnft_config_from_request({"iteratons": 3}, cases, tmp_path / "m.pt", tmp_path / "run", tmp_path / "p")

    from diffkt3d.models.registry import ModelRegistry

    task = ScardNFTTrainTask(tmp_path / "model", PreferenceStore(tmp_path / "prefs"), lambda: None,
                             ModelRegistry(tmp_path / "reg", None))
    config = task.config()
    if not task.available():
        assert config == {"available": False, "reason": config["reason"]} and "peft" in config["reason"]
        return
    recipe = read_recipe(REPO / "configs/scardnft-cpu.yaml")
    assert config["iterations"] == recipe["iterations"] and config["reward.w_mae"] == recipe["reward"]["w_mae"]
    assert not {k for k in config if k.split(".")[0] in SCARDNFT_DECIDED}
