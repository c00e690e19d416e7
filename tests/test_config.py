"""The run configuration (runtime §7.6): strict keys and types, layer precedence, `--set` literals,
the TOML writer's round trip, repeating a run from its `config.toml`, and one-line CLI errors."""

import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.codec import stable_payload
from esper.events.log_reader import LogReader
from esper.policy.run_config import (
    ConfigError,
    RunConfig,
    dump_toml,
    merge,
    parse_set,
    read_file,
    resolve,
    structure,
    unstructure,
)

# -- helpers ----------------------------------------------------------------------------------


def error_of(*layers: dict) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(*layers)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def invoke(*args: str):
    result = CliRunner().invoke(cli, ["run", "--quiet", *args])
    return result.exit_code, result.stdout, result.stderr


def records(run_dir: Path) -> list:
    return list(LogReader(run_dir / "events.elog").records())


def payloads(run_dir: Path) -> list[bytes]:
    return [stable_payload(r) for r in records(run_dir)[1:]]


def as_lists(value):
    """TOML has arrays, not tuples: compare sequences as lists."""
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value


def round_trip(config: RunConfig) -> dict:
    return tomllib.loads(dump_toml(unstructure(config)))


# -- unknown keys -----------------------------------------------------------------------------


def test_an_unknown_section_is_refused_with_a_suggestion():
    message = error_of({"rnu": {"epochs": 3}})
    assert message == "unknown config key 'rnu' (did you mean 'run'?)"


@pytest.mark.parametrize("layer, key, suggestion", [
    ({"run": {"epochz": 3}}, "run.epochz", "run.epochs"),
    ({"lifecycle": {"max_seed": 2}}, "lifecycle.max_seed", "lifecycle.max_seeds"),
    ({"governor": {"snapshot_evry": 2}}, "governor.snapshot_evry", "governor.snapshot_every"),
    ({"train": {"ampp": "bf16"}}, "train.ampp", "train.amp"),
])
def test_an_unknown_nested_key_is_refused_with_the_dotted_key_and_a_suggestion(layer, key, suggestion):
    message = error_of(layer)
    assert message == f"unknown config key '{key}' (did you mean '{suggestion}'?)"


def test_an_unknown_key_in_any_layer_is_refused_even_when_a_later_layer_is_valid():
    message = error_of({"run": {"seeed": 1}}, {"run": {"seed": 2}})
    assert "'run.seeed'" in message and "did you mean 'run.seed'" in message


def test_a_scalar_where_a_section_belongs_is_refused():
    message = error_of({"run": 3})
    assert "'run'" in message


# -- types and ranges -------------------------------------------------------------------------


@pytest.mark.parametrize("layer, key", [
    ({"run": {"epochs": "ten"}}, "run.epochs"),
    ({"run": {"seed": [1, 2]}}, "run.seed"),
    ({"train": {"min_lr_ratio": "low"}}, "train.min_lr_ratio"),
    ({"governor": {"window": {"a": 1}}}, "governor.window"),
    ({"lifecycle": {"blend_steps": "five"}}, "lifecycle.blend_steps"),
])
def test_a_wrong_type_is_a_one_line_error_naming_the_dotted_key(layer, key):
    assert f"'{key}'" in error_of(layer)


@pytest.mark.parametrize("layer, key", [
    ({"run": {"epochs": 0}}, "run.epochs"),
    ({"run": {"keep_checkpoints": 1}}, "run.keep_checkpoints"),
    ({"run": {"fsync": "sometimes"}}, "run.fsync"),
    ({"train": {"min_lr_ratio": 1.5}}, "train.min_lr_ratio"),
    ({"train": {"amp": "fp8"}}, "train.amp"),
    ({"lifecycle": {"g3_min_alpha": 1.5}}, "lifecycle.g3_min_alpha"),
    ({"governor": {"max_rollbacks": -1}}, "governor.max_rollbacks"),
])
def test_an_out_of_range_value_is_an_error_naming_the_dotted_key(layer, key):
    assert key in error_of(layer)


@pytest.mark.parametrize("layer, key, value", [
    ({"run": {"epochs": "ten"}}, "run.epochs", "ten"),
    ({"run": {"epochs": 0}}, "run.epochs", "0"),
    ({"train": {"min_lr_ratio": 1.5}}, "train.min_lr_ratio", "1.5"),
])
def test_type_and_range_errors_name_the_value_received(layer, key, value):
    """§7.6: 'Type and range errors name the dotted key, the expected type or range, and the value
    received.'"""
    message = error_of(layer)
    assert key in message and value in message, message


@pytest.mark.parametrize("layer", [
    {"run": {"epochs": "5"}},  # a string is not an integer
    {"run": {"epochs": 2.7}},  # no silent truncation
    {"run": {"epochs": True}},  # TOML booleans are not integers
    {"run": {"deterministic": "false"}},  # bool("false") is True
    {"run": {"deterministic": 1}},
    {"run": {"slots": "mid"}},  # not ('m', 'i', 'd')
    {"run": {"device": 3}},
    {"train": {"min_lr_ratio": True}},
])
def test_values_of_the_wrong_toml_type_are_refused_not_coerced(layer):
    """Nothing is accepted and then silently turned into something else (§7.6, §8 rule 2)."""
    section, values = next(iter(layer.items()))
    key = next(iter(values))
    assert f"{section}.{key}" in error_of(layer)


# -- precedence -------------------------------------------------------------------------------


def test_task_defaults_override_the_built_in_defaults():
    built_in, text = RunConfig(), resolve({"run": {"task": "text"}})
    assert (built_in.run.epochs, built_in.train.lr_schedule, built_in.train.grad_clip) == (30, "none", 0.0)
    assert (text.run.epochs, text.train.lr_schedule, text.train.grad_clip) == (20, "cosine", 1.0)
    assert text.governor.absolute == 15.0 and resolve({}).governor.absolute == 12.0
    assert resolve({}).run.epochs == 30  # digits' own default


def test_file_then_flags_then_set_each_override_the_layers_before():
    file_layer = {"run": {"task": "text", "epochs": 7, "seed": 1, "policy": "random"},
                  "train": {"grad_clip": 0.5}, "lifecycle": {"max_seeds": 2}}
    flag_layer = {"run": {"epochs": 8, "seed": 2}}
    set_layer = {"run": {"epochs": 9}, "lifecycle": {"blend_steps": 4}}

    only_file = resolve(file_layer)
    assert (only_file.run.epochs, only_file.train.grad_clip) == (7, 0.5)  # file over task default
    assert only_file.train.lr_schedule == "cosine"  # task default kept where the file is silent

    config = resolve(file_layer, flag_layer, set_layer)
    assert config.run.epochs == 9  # --set over the flag over the file
    assert config.run.seed == 2  # the flag over the file
    assert config.run.policy == "random" and config.train.grad_clip == 0.5  # the file where later layers are silent
    assert config.lifecycle.max_seeds == 2 and config.lifecycle.blend_steps == 4  # sections merge key by key
    assert config.train.lr_schedule == "cosine" and config.governor.absolute == 15.0  # task defaults
    assert config.lifecycle.g3_min_alpha == RunConfig().lifecycle.g3_min_alpha  # built-in default


def test_the_task_defaults_follow_the_task_named_by_the_last_layer():
    config = resolve({"run": {"task": "digits"}}, {"run": {"task": "text"}})
    assert config.run.task == "text" and config.train.lr_schedule == "cosine"


def test_merge_is_deep_and_leaves_its_inputs_alone():
    base = {"run": {"epochs": 1, "seed": 2}}
    layer = {"run": {"epochs": 3}, "train": {"amp": "bf16"}}
    assert merge(base, layer) == {"run": {"epochs": 3, "seed": 2}, "train": {"amp": "bf16"}}
    assert base == {"run": {"epochs": 1, "seed": 2}} and layer == {"run": {"epochs": 3}, "train": {"amp": "bf16"}}


# -- --set ------------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment, expected", [
    ("run.epochs=12", {"run": {"epochs": 12}}),
    ("train.min_lr_ratio=0.25", {"train": {"min_lr_ratio": 0.25}}),
    ("lifecycle.g5_min_contribution=1e-3", {"lifecycle": {"g5_min_contribution": 0.001}}),
    ("train.compile=true", {"train": {"compile": True}}),
    ("run.greedy=false", {"run": {"greedy": False}}),
    ('run.device="cpu"', {"run": {"device": "cpu"}}),
    ("run.device='cuda:1'", {"run": {"device": "cuda:1"}}),
    ("run.device=cpu", {"run": {"device": "cpu"}}),  # a bare word is a string
    ('run.slots=["mid", "late"]', {"run": {"slots": ["mid", "late"]}}),
    ("run.blueprints=[]", {"run": {"blueprints": []}}),
    ("run.epochs = 3", {"run": {"epochs": 3}}),
])
def test_set_values_are_toml_literals(assignment, expected):
    assert parse_set(assignment) == expected


def test_set_values_reach_the_configuration_with_their_types():
    config = resolve(*(parse_set(a) for a in (
        "run.epochs=12", "train.min_lr_ratio=0.25", "train.compile=true", "run.device=cpu",
        'run.slots=["mid", "late"]', "run.epochs=13")))
    assert config.run.epochs == 13 and config.train.min_lr_ratio == 0.25 and config.train.compile is True
    assert config.run.device == "cpu" and config.run.slots == ("mid", "late")


@pytest.mark.parametrize("assignment", ["run.epochs", "=3", ""])
def test_a_set_without_key_and_value_is_an_error(assignment):
    with pytest.raises(ConfigError) as info:
        parse_set(assignment)
    assert "--set" in str(info.value) and "\n" not in str(info.value)


# -- the writer's round trip ------------------------------------------------------------------


def _candidates(section: str, field: attrs.Attribute, default):
    """Values different from the default, tried in order until the section's validators accept one."""
    kind = field.type
    if kind is bool:
        return [not default]
    if kind is int:
        return [default + 1, default + 2, default - 1]
    if kind is float:
        return [default + 0.1, default - 0.1, default / 2, -0.75]
    if kind is str:
        options = _options(field.validator)
        if options:
            return [o for o in options if o != default]
        return ['a "quoted" C:\\path with ü', "cpu", "text"]
    if typing.get_origin(kind) is tuple:
        return [("mid", 'odd "name"', "back\\slash"), ("conv_light", "norm"), ("mid",), ("gated", "linear")]
    if typing.get_origin(kind) is dict:
        return [{**default, "norm": (1.0, 0.25, 0.5, 2.0)}]
    raise AssertionError(f"no candidate values for {section}.{field.name} of type {kind}")


def _options(validator) -> tuple:
    if validator is None:
        return ()
    if hasattr(validator, "options"):
        return tuple(validator.options)
    for inner in getattr(validator, "_validators", ()):
        found = _options(inner)
        if found:
            return found
    return ()


def every_key_changed() -> tuple[RunConfig, list[str]]:
    sections, unchanged = {}, []
    for section_field in attrs.fields(RunConfig):
        cls = attrs.resolve_types(section_field.type)
        current = cls()
        for field in attrs.fields(cls):
            default = getattr(current, field.name)
            for value in _candidates(section_field.name, field, default):
                try:
                    current = attrs.evolve(current, **{field.name: value})
                    break
                except (ValueError, TypeError):
                    continue
            else:
                unchanged.append(f"{section_field.name}.{field.name}")
        sections[section_field.name] = current
    return RunConfig(**sections), unchanged


def test_the_default_configuration_round_trips_through_toml():
    config = RunConfig()
    loaded = round_trip(config)
    assert loaded == as_lists(unstructure(config))
    assert structure(loaded) == config


def test_a_configuration_with_every_key_changed_round_trips_through_toml():
    config, unchanged = every_key_changed()
    assert not unchanged, f"no valid non-default value found for {unchanged}"
    default = unstructure(RunConfig())
    data = unstructure(config)
    for section, values in data.items():
        for key, value in values.items():
            assert value != default[section][key], f"{section}.{key} was not changed"
    loaded = round_trip(config)
    assert loaded == as_lists(data)
    assert structure(loaded) == config
    # The text itself is stable: writing what was read gives the same bytes.
    assert dump_toml(unstructure(structure(loaded))) == dump_toml(data)


def test_the_resolved_configuration_of_every_task_round_trips():
    for task in ("digits", "cifar10", "cifar10_impaired", "text", "synthetic"):
        config = resolve({"run": {"task": task}})
        assert structure(round_trip(config)) == config


def test_read_file_reads_what_dump_toml_wrote(tmp_path):
    config, _ = every_key_changed()
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(unstructure(config)))
    assert structure(read_file(path)) == config


# -- through the command line -----------------------------------------------------------------


def test_cli_precedence_file_then_flags_then_set(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[run]\ntask = "synthetic"\nepochs = 5\nseed = 7\npolicy = "random"\n'
                    '[lifecycle]\nblend_steps = 4\n')
    code, _, stderr = invoke("--config", str(path), "--epochs", "3", "--policy", "none",
                             "--set", "run.epochs=2", "--set", "run.threads=1", "--set", 'run.slots=["mid", "late"]',
                             "--out", str(tmp_path), "--name", "r")
    assert code == 0, stderr
    written = tomllib.loads((tmp_path / "r" / "config.toml").read_text())
    run = written["run"]
    assert run["epochs"] == 2  # --set over --epochs over the file over the task default (20)
    assert run["policy"] == "none"  # --policy over the file
    assert run["seed"] == 7 and written["lifecycle"]["blend_steps"] == 4  # the file where nothing later speaks
    assert run["threads"] == 1 and run["slots"] == ["mid", "late"]
    log = records(tmp_path / "r")
    assert log[0].event.config == written  # RunStarted holds the same configuration
    assert [r.event.epoch for r in log if isinstance(r.event, ev.EpochCompleted)] == [1, 2]


def test_a_run_repeats_from_its_config_toml(tmp_path):
    code, _, stderr = invoke("--task", "synthetic", "--policy", "random", "--epochs", "6", "--seed", "3",
                             "--set", "run.threads=1", "--set", "lifecycle.blend_steps=2",
                             "--out", str(tmp_path), "--name", "first")
    assert code == 0, stderr
    code, _, stderr = invoke("--config", str(tmp_path / "first" / "config.toml"), "--out", str(tmp_path),
                             "--name", "again")
    assert code == 0, stderr
    first, again = tmp_path / "first", tmp_path / "again"
    assert (again / "config.toml").read_text() == (first / "config.toml").read_text()
    assert records(again)[0].event.config_hash == records(first)[0].event.config_hash
    assert any(isinstance(r.event, ev.PolicyDecided) and r.event.commands for r in records(first))
    assert payloads(again) == payloads(first)


def _bad_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


USER_ERRORS = {
    "missing file": (lambda t: ["--config", str(t / "absent.toml")], "absent.toml"),
    "invalid toml": (lambda t: ["--config", _bad_file(t, "[run\nepochs = 3\n")], "not valid TOML"),
    "unknown key in file": (lambda t: ["--config", _bad_file(t, "[run]\nepochz = 3\n")], "did you mean 'run.epochs'"),
    "unknown section in file": (lambda t: ["--config", _bad_file(t, "[lifecyle]\nmax_seeds = 1\n")],
                                "did you mean 'lifecycle'"),
    "unknown key by --set": (lambda t: ["--set", "governor.windw=3"], "did you mean 'governor.window'"),
    "wrong type in file": (lambda t: ["--config", _bad_file(t, '[run]\nepochs = "ten"\n')], "run.epochs"),
    "wrong type by --set": (lambda t: ["--set", "run.seed=abc"], "run.seed"),
    "out of range by --set": (lambda t: ["--set", "run.epochs=0"], "run.epochs"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_config_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, case):
    make_args, fragment = USER_ERRORS[case]
    out = tmp_path / "out"
    code, stdout, stderr = invoke("--task", "synthetic", *make_args(tmp_path), "--out", str(out))
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("esper: error: "), stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout
    assert not out.exists() or not any(out.iterdir()), "no run directory before the configuration is valid"


def test_the_installed_program_prints_config_errors_as_one_line(tmp_path):
    """`python -m esper` (the real entry point, not CliRunner): exit 2, one line, no traceback."""
    cases = [["--config", str(tmp_path / "absent.toml")], ["--set", "run.epochz=3"]]
    children = [subprocess.Popen([sys.executable, "-m", "esper", "run", "--out", str(tmp_path / "out"), *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in cases]
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        assert child.returncode == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("esper: error: "), stderr
        assert "Traceback" not in stderr + stdout
    assert not (tmp_path / "out").exists()
