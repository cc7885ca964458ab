"""The `starflow` terminal app: one typer application, one module per command.

Errors the user can fix (`StarFlowError`, an existing output, a missing file) print one line
and exit 1; anything else is a bug: one line naming `--debug`, which shows the traceback.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from mlx_starflow.errors import StarFlowError

from .commands import convert as convert_command
from .commands import export_coreml as export_coreml_command
from .commands import export_pth as export_pth_command
from .commands import demo_data as demo_data_command
from .commands import train as train_command
from .commands import generate as generate_command
from .commands import info as info_command
from .commands import score as score_command

app = typer.Typer(
    name="starflow",
    help="STARFlow text-to-image on Apple Silicon with MLX: generate, convert, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("convert")(convert_command.convert)
app.command("export-coreml")(export_coreml_command.export_coreml)
app.command("export-pth")(export_pth_command.export_pth)
app.command("train")(train_command.train)
app.command("demo-data")(demo_data_command.demo_data)
app.command("generate")(generate_command.generate)
app.command("info")(info_command.info)
app.command("score")(score_command.score)

stderr = Console(stderr=True, highlight=False)
_state = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logging.")) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `starflow` script; returns the exit code.

    typer handles usage errors itself (message and exit code 2) and turns Ctrl-C into exit 1.
    """
    try:
        app(args=argv, prog_name="starflow")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except (StarFlowError, FileExistsError, FileNotFoundError, PermissionError, ValueError) as error:
        if _state["debug"]:
            raise
        stderr.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        return 1
    except Exception as error:  # a bug: keep the one-line contract, the traceback is one flag away
        if _state["debug"]:
            raise
        stderr.print(f"[red]internal error:[/red] {type(error).__name__}: {escape(str(error))} "
                     "(run again with --debug for the traceback)", soft_wrap=True)
        return 1
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
