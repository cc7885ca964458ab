"""The `starflow` terminal app: one typer application, one module per command.

Errors the user can fix (`StarFlowError`, an existing output, a missing file) print one line
and exit 1; anything else is a bug: one line naming `--debug`, which shows the traceback.
"""

from __future__ import annotations

import logging
import sys

import click
import typer
from rich.console import Console
from rich.markup import escape

from mlx_starflow.errors import StarFlowError

from .commands import convert as convert_command

app = typer.Typer(
    name="starflow",
    help="STARFlow text-to-image on Apple Silicon with MLX: generate, convert, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("convert")(convert_command.convert)

stderr = Console(stderr=True, highlight=False)
_state = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logging.")) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `starflow` script; returns the exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as usage:
        usage.show()
        return usage.exit_code
    except click.exceptions.Abort:
        stderr.print("interrupted")
        return 130
    except (StarFlowError, FileExistsError, FileNotFoundError, PermissionError, ValueError) as error:
        if _state["debug"]:
            raise
        stderr.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        stderr.print("interrupted")
        return 130
    except Exception as error:  # a bug: keep the one-line contract, the traceback is one flag away
        if _state["debug"]:
            raise
        stderr.print(f"[red]internal error:[/red] {type(error).__name__}: {escape(str(error))} (run again with --debug for the traceback)", soft_wrap=True)
        return 1
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
