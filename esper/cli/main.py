"""`esper`: the command-line entry point. Commands live one per module; this file only wires them."""

import sys
import traceback

import click

from esper.cli.errors import EXIT_INTERNAL, EXIT_USER
from esper.cli.log_cmd import log
from esper.cli.schemas_cmd import schemas


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Esper trains neural networks that grow."""
    ctx.obj = {"debug": debug}


for command in (log, schemas):
    cli.add_command(command)


def main() -> None:
    debug = "--debug" in sys.argv[1:2]
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        code = 130
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        exc.show()
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except Exception:
        traceback.print_exc()
        click.echo("esper: internal error: this is a bug; please report it with the traceback above", err=True)
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["cli", "main", "EXIT_USER"]
