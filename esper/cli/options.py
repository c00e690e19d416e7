"""Command-line options as configuration layers, in the precedence of runtime §7.6:
`--config` file < flags < `--set`."""

from pathlib import Path

import click

from esper.policy import run_config


def csv_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def layers(config_file: Path | None, flags: dict[str, dict], assignments: tuple[str, ...]) -> list[dict]:
    """`flags` maps a config section to its keys; a flag left out (None) sets nothing, so the file
    or the defaults decide. Raises ConfigError for an unreadable file or a malformed --set."""
    given = {section: {k: v for k, v in keys.items() if v is not None} for section, keys in flags.items()}
    found = [run_config.read_file(config_file)] if config_file else []
    return found + [{s: keys for s, keys in given.items() if keys}] + [run_config.parse_set(a) for a in assignments]


def merged(layers: list[dict]) -> dict:
    """The layers as one, later ones winning: on resume every option given is checked against the
    recorded configuration, none is ignored."""
    overrides: dict = {}
    for given in layers:
        overrides = run_config.merge(overrides, given)
    return overrides


def worker_args(ctx: click.Context, dropped: tuple[str, ...]) -> list[str]:
    """The options the command was given, less `dropped`: what each torchrun worker runs."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if param.name in dropped or value is None or value is False or value == ():
            continue
        if getattr(param, "is_flag", False):
            args.append(param.opts[0])
            continue
        for item in value if param.multiple else [value]:
            args += [param.opts[0], str(item)]
    return args
