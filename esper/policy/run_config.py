"""The run configuration (runtime §7.6): TOML sections structured strictly into frozen attrs classes.

Precedence: built-in defaults < task defaults < `--config` file < CLI flags < `--set`. Every layer
is a plain nested dict merged in that order; cattrs then structures the result once, so every key
is checked the same way whatever layer set it.
"""

import difflib
import hashlib
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs

from esper.compute.settings import (
    DistSettings,
    GovernorSettings,
    RunSettings,
    SimulatedSettings,
    TaskSettings,
    TrainSettings,
)
from esper.lifecycle.config import LifecycleConfig
from esper.policy.heuristic import HeuristicConfig
from esper.policy.ppo_config import PPOConfig
from esper.policy.rewards import RewardConfig
from esper.tasks.spec import get_task


@attrs.frozen
class RunConfig:
    run: RunSettings = RunSettings()
    task: TaskSettings = TaskSettings()
    train: TrainSettings = TrainSettings()
    lifecycle: LifecycleConfig = LifecycleConfig()
    governor: GovernorSettings = GovernorSettings()
    heuristic: HeuristicConfig = HeuristicConfig()
    ppo: PPOConfig = PPOConfig()
    reward: RewardConfig = RewardConfig()
    dist: DistSettings = DistSettings()
    simulated: SimulatedSettings = SimulatedSettings()


class ConfigError(ValueError):
    """A one-line configuration error naming the dotted key."""

    def __init__(self, message: str) -> None:
        # A quoted TOML key may hold any character: escape line breaks so the message stays one line.
        super().__init__(re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029]", lambda m: ascii(m.group())[1:-1], message))


_converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(kind: type, accepts: tuple[type, ...]):
    """cattrs would coerce (int(1.5) == 1, str(3) == '3'); a config value of the wrong type is an error."""

    def structure(value: Any, _type: type) -> Any:
        if isinstance(value, bool) and kind is not bool or not isinstance(value, accepts):
            raise TypeError(f"expected {kind.__name__}, got {value!r}")
        return kind(value)

    return structure


for _kind, _accepts in ((int, (int,)), (float, (int, float)), (str, (str,)), (bool, (bool,))):
    _converter.register_structure_hook(_kind, _strict(_kind, _accepts))


def _names(value: Any, _type: Any) -> tuple[str, ...]:
    # A bare string would otherwise become a tuple of its characters.
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return tuple(value)


_converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _names)


def _field_names(cls: type) -> dict[str, Any]:
    return {f.name: f for f in attrs.fields(cls)}


def _check_keys(data: dict[str, Any], cls: type, prefix: str = "") -> None:
    """Unknown keys first, with a suggestion, before cattrs sees anything."""
    fields = _field_names(cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            choices = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(dotted, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(choices)})"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        field_type = fields[key].type
        if attrs.has(field_type):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a table, got {value!r}")
            _check_keys(value, field_type, f"{dotted}.")


def merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def task_defaults(task_name: str) -> dict[str, Any]:
    spec = get_task(task_name)
    # The 8x8 hosts are too small to share among threads: measured on 2 cores, a 30-epoch digits
    # run took 6.2 s on one thread and 18 s on two while the machine had other work.
    small = spec.dataset in ("digits", "synthetic")
    return {
        "run": {"epochs": spec.default_epochs, **({"threads": 1} if small else {})},
        "train": {"lr_schedule": spec.lr_schedule, "grad_clip": spec.grad_clip,
                  "warmup_steps": spec.warmup_steps, "min_lr_ratio": spec.min_lr_ratio},
        "governor": {"absolute": 15.0 if spec.topology == "transformer" else 12.0},
    }


def parse_set(assignment: str) -> dict[str, Any]:
    """`a.b=VALUE` with VALUE a TOML literal (a bare word is taken as a string)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set needs KEY=VALUE, got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node: dict[str, Any] = {}
    target = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value
    return node


def read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{path}'") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from None


def resolve(*layers: dict[str, Any]) -> RunConfig:
    """Merge user layers over the task defaults over the built-in defaults, and structure."""
    user: dict[str, Any] = {}
    for layer in layers:
        _check_keys(layer, RunConfig)
        user = merge(user, layer)
    task = user.get("run", {}).get("task", RunSettings().task)
    if not isinstance(task, str):
        raise ConfigError(f"config key 'run.task' expects a string, got {task!r}")
    return structure(merge(task_defaults(task), user))


def structure(data: dict[str, Any]) -> RunConfig:
    _check_keys(data, RunConfig)
    try:
        return _converter.structure(data, RunConfig)
    except cattrs.BaseValidationError as exc:
        messages = cattrs.transform_error(exc, path="", format_exception=_describe)
        raise ConfigError(_first_line(messages)) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid config value: {exc}") from None


def _describe(exc: BaseException, _type: Any) -> str:
    """Validators and the strict hooks above already say what was expected and what came; attrs'
    validators put the field's name first in quotes, or pass the attribute along."""
    args = exc.args
    if len(args) > 1 and isinstance(args[1], attrs.Attribute):
        return f"{args[1].name}: {args[0]}"
    named = re.match(r"'(\w+)' (.*)", str(args[0]) if args else "")
    if named:
        return f"{named.group(1)}: {named.group(2)}"
    field = re.match(r"(\w+) (must .*)", str(args[0]) if args else "")
    if field:
        return f"{field.group(1)}: {field.group(2)}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _first_line(messages: list[str]) -> str:
    message = messages[0] if messages else "invalid configuration"
    what, _, where = message.rpartition(" @ ")
    if not where:
        return message
    where = where.lstrip(".")
    field, sep, rest = what.partition(": ")
    if sep and re.fullmatch(r"\w+", field) and not where.endswith(field):
        where, what = f"{where}.{field}", rest
    return f"config key '{where}': {what}"


def unstructure(config: RunConfig) -> dict[str, Any]:
    return _converter.unstructure(config)


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(dump_toml(unstructure(config)).encode()).hexdigest()


def dump_toml(data: dict[str, Any]) -> str:
    """The TOML subset the configuration uses: tables of str, int, float, bool, lists of those and
    inline tables (`simulated.blueprints`)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_literal(value)}")
        lines.append("")
    return "\n".join(lines)


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _literal(key)
