"""`esper schemas`: regenerate or check the checked-in JSON Schema of the events."""

from pathlib import Path

import click

from esper.cli.errors import CheckFailed
from esper.events import schema


@click.command("schemas")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("schemas"),
              show_default=True, help="Directory holding events.schema.json.")
@click.option("--check", is_flag=True, help="Exit 1 if the stored schema differs from the code.")
def schemas(out_dir: Path, check: bool) -> None:
    """Write (or --check) schemas/events.schema.json from the event types."""
    if check:
        problem = schema.check(out_dir)
        if problem:
            raise CheckFailed(problem)
        click.echo(f"{out_dir / schema.SCHEMA_FILE} is up to date")
        return
    click.echo(f"wrote {schema.write(out_dir)}")
