"""The experiment contract (lmpg_utils/configs.py): every experiment module exposes the
same names, is reached through one registry, takes --set overrides, reads no environment,
imports no other experiment, and prints a summary with the same leading keys."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_configs import TINY

from lmpg_utils import __main__ as cli
from lmpg_utils import configs
from lmpg_utils.distributed import SINGLE

PACKAGE = Path(cli.__file__).resolve().parent
EXPERIMENT_FILES = sorted((PACKAGE / "experiments").glob("ch*.py"))


def test_the_registry_lists_every_experiment_file_once():
    assert sorted(f"{m}.py" for m in cli.EXPERIMENTS.values()) == sorted(
        f.name for f in EXPERIMENT_FILES
    )
    assert sorted(TINY) == sorted(cli.EXPERIMENTS)


@pytest.mark.parametrize("name", list(cli.EXPERIMENTS))
def test_every_experiment_has_the_same_names(name):
    module = cli.experiment_module(name)
    assert module.NAME == name
    config_type = module.Config
    assert dataclasses.is_dataclass(config_type)
    assert config_type.__dataclass_params__.frozen
    assert dataclasses.fields(config_type)[0].name == "profile"
    assert sorted(module.PROFILES) == ["full", "quick"]
    for profile, config in module.PROFILES.items():
        assert type(config) is config_type and config.profile == profile
    assert module.PROFILES["quick"] != module.PROFILES["full"]
    for function in (module.run, module.prepare_models):
        parameters = inspect.signature(function).parameters
        assert list(parameters)[:4] == ["config", "seed", "device", "progress"]
        for keyword in ("seed", "device", "progress", "world"):
            assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters["world"].default is SINGLE  # one process unless torchrun
    assert callable(module.Result.summary)


@pytest.mark.parametrize("name", list(cli.EXPERIMENTS))
def test_every_setting_of_every_profile_can_be_set_from_text(name):
    module = cli.experiment_module(name)
    for config in module.PROFILES.values():
        for key in configs.setting_names(config):
            if key == "profile":
                continue
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            assert configs.apply_overrides(config, [f"{key}={text}"]) == config, key


def test_overrides_reach_nested_fields_and_name_what_is_wrong():
    config = cli.experiment_module("gpt").PROFILES["quick"]
    nested = [k for k in configs.setting_names(config) if k.endswith("d_model")][0]
    changed = configs.apply_overrides(config, [f"{nested}=64"])
    value = changed
    for part in nested.split("."):
        value = getattr(value, part)
    assert value == 64 and changed != config
    with pytest.raises(ValueError, match="unknown setting 'no_such_field'.*valid"):
        configs.apply_overrides(config, ["no_such_field=1"])
    with pytest.raises(ValueError, match="key=value"):
        configs.apply_overrides(config, ["d_model"])
    with pytest.raises(ValueError, match=nested.replace(".", r"\.")):
        configs.apply_overrides(config, [f"{nested}=wide"])
    with pytest.raises(ValueError, match="--profile"):
        configs.apply_overrides(config, ["profile=full"])


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
            names += [
                "." * node.level + (node.module or "") + "." + alias.name
                for alias in node.names
            ]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.name)
def test_no_experiment_imports_another(path):
    others = {f.stem for f in EXPERIMENT_FILES if f != path}
    for name in _imports(path):
        parts = set(name.replace(".", " ").split())
        assert not parts & others, f"{path.name} imports {name}"
        assert "lmpg_utils.experiments" not in name, f"{path.name} imports {name}"


# the edge resolves profile, device, threads and seed; these modules may read the env
ENVIRONMENT_READERS = {"runtime.py", "caching.py", "corpora.py"}


def test_nothing_below_the_edge_reads_the_environment_or_resolves_the_run():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ENVIRONMENT_READERS or path.name == "__main__.py":
            continue
        source = path.read_text()
        relative = path.relative_to(PACKAGE)
        assert "os.environ" not in source and "getenv" not in source, relative
        for call in ("get_profile(", "get_device(", "set_threads(", "resolve("):
            assert f"runtime.{call}" not in source, f"{relative} calls runtime.{call}"


def test_cli_rejects_bad_settings_by_name(capsys):
    for argv, words in (
        (["run", "gpt", "--set", "no_such_field=1"], ["no_such_field", "valid"]),
        (["run", "gpt", "--set", "steps"], ["key=value"]),
        (["run", "pg", "--set", "estimator=guess"], ["guess", "leave-one-out"]),
    ):
        with pytest.raises(SystemExit) as error:
            cli.main([*argv, "--device", "cpu"])
        err = capsys.readouterr().err
        assert error.value.code == 2 and all(w in err for w in words), err


def test_show_config_prints_the_config_after_set(capsys):
    assert cli.main(["run", "pg", "--profile", "full", "--show-config",
                     "--device", "cpu", "--set", "pg_steps=7"]) == 0  # fmt: skip
    config = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert config["profile"] == "full" and config["pg_steps"] == 7


@pytest.mark.parametrize("name", list(cli.EXPERIMENTS))
def test_every_experiment_runs_from_the_command_line_with_the_same_summary_keys(name):
    done = subprocess.run(
        [sys.executable, "-m", "lmpg_utils", "run", name, "--profile", "quick",
         "--device", "cpu", "--threads", "1", "--seed", "0",
         *[arg for setting in TINY[name] for arg in ("--set", setting)]],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(configs.SUMMARY_KEYS) <= set(summary)
    assert summary["experiment"] == name and summary["profile"] == "quick"
    assert summary["device"] == "cpu" and summary["seed"] == 0
    assert summary["seconds"] > 0
    assert summary["config"] == json.loads(
        json.dumps(
            dataclasses.asdict(
                configs.apply_overrides(
                    cli.experiment_module(name).PROFILES["quick"], TINY[name]
                )
            )
        )
    )
