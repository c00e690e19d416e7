"""Command-line options as configuration layers, in the precedence of runtime §7.6:
`--config` file < flags < `--set`."""

from pathlib import Path

from esper.policy import run_config


def csv_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def layers(config_file: Path | None, flags: dict[str, dict], assignments: tuple[str, ...]) -> list[dict]:
    """`flags` maps a config section to its keys; a flag left out (None) sets nothing, so the file
    or the defaults decide. Raises ConfigError for an unreadable file or a malformed --set."""
    given = {section: {k: v for k, v in keys.items() if v is not None} for section, keys in flags.items()}
    found = [run_config.read_file(config_file)] if config_file else []
    return found + [{s: keys for s, keys in given.items() if keys}] + [run_config.parse_set(a) for a in assignments]
