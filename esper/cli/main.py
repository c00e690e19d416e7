"""`esper`: the command-line entry point. Commands live one per module and load on first use, so
`esper log check` never pays for importing torch."""

import importlib
import sys
import traceback

import click

from esper.cli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER

COMMANDS = {
    "evaluate": "esper.cli.evaluate_cmd:evaluate",
    "export": "esper.cli.export_cmd:export",
    "fork": "esper.cli.fork_cmd:fork",
    "log": "esper.cli.log_cmd:log",
    "replay": "esper.cli.replay_cmd:replay",
    "report": "esper.cli.report_cmd:report",
    "run": "esper.cli.run_cmd:run",
    "schemas": "esper.cli.schemas_cmd:schemas",
    "sql": "esper.cli.sql_cmd:sql",
    "train-policy": "esper.cli.train_cmd:train_policy",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Esper trains neural networks that grow."""
    ctx.obj = {"debug": debug}


def main() -> None:
    debug = "--debug" in sys.argv[1:2]
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        code = EXIT_INTERRUPTED
    except click.UsageError as exc:
        names, ctx = [], exc.ctx  # the subcommand path, whatever the program was called
        while ctx is not None and ctx.parent is not None:
            names.insert(0, ctx.info_name)
            ctx = ctx.parent
        hint = f" (see '{' '.join(['esper', *names])} --help')"
        click.echo(f"esper: error: {exc.format_message()}{hint}", err=True)
        code = EXIT_USER
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        exc.show()
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        click.echo("esper: internal error: this is a bug; please report it with the traceback above", err=True)
        code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else 0)
