"""One exit-code table for every command (runtime spec §7.7) and the one-line user error."""

import click

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USER = 2
EXIT_RUN_FAILED = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class UserError(click.ClickException):
    """Printed as exactly one line, `esper: error: <what> (<hint>)`, exit code 2."""

    exit_code = EXIT_USER

    def show(self, file=None) -> None:
        click.echo(f"esper: error: {self.format_message()}", err=True)


class CheckFailed(UserError):
    """A check found a problem (verify violation, divergence, stale schema): exit code 1."""

    exit_code = EXIT_CHECK_FAILED


class RunFailed(UserError):
    """The run itself failed (governor exhausted, disk full, fsync error): exit code 3."""

    exit_code = EXIT_RUN_FAILED
