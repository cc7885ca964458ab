"""The `starflow` terminal app: one typer application, one module per command.

Errors the user can fix print one line and exit 1: our own `StarFlowError`s, and OS failures
that come from the machine (disk full, read-only folder, permissions). Anything else, a
`ValueError` from deep inside MLX included, is a bug: one line naming `--debug`, which shows
the traceback. SIGTERM is handled as Ctrl-C, so temporary files and folders are cleaned up.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx
import typer
from rich.console import Console
from rich.markup import escape

import mlx_starflow
from mlx_starflow.errors import StarFlowError, environment_error

from .commands import convert as convert_command
from .commands import export_coreml as export_coreml_command
from .commands import export_pth as export_pth_command
from .commands import demo_data as demo_data_command
from .commands import train as train_command
from .commands import generate as generate_command
from .commands import info as info_command
from .commands import score as score_command
from .commands import invert as invert_command
from .commands import edit as edit_command
from .commands import vary as vary_command
from .commands import interpolate as interpolate_command
from .commands import rank as rank_command

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
app.command("invert")(invert_command.invert)
app.command("edit")(edit_command.edit)
app.command("vary")(vary_command.vary)
app.command("interpolate")(interpolate_command.interpolate)
app.command("rank")(rank_command.rank)

stderr = Console(stderr=True, highlight=False)
_state = {"debug": False}


def installed_version() -> str:
    try:
        return version("mlx-starflow")
    except PackageNotFoundError:
        return mlx_starflow.__version__


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"starflow {installed_version()} (mlx {mx.__version__}, Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logging."),
    show_version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `starflow` script; returns the exit code.

    typer handles usage errors itself (message and exit code 2) and turns Ctrl-C (and SIGTERM)
    into exit code 130, as shells report an interrupted command.
    """
    _state["debug"] = False
    with _terminate_as_interrupt():
        try:
            app(args=argv, prog_name="starflow")
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except StarFlowError as error:
            return _report(error)
        except OSError as error:
            user_error = environment_error(error)
            if user_error is None:
                return _internal(error)
            return _report(user_error, error)
        except Exception as error:  # a bug: keep the one-line contract, the traceback is one flag away
            return _internal(error)
    return 0


def _report(error: StarFlowError, cause: BaseException | None = None) -> int:
    if _state["debug"]:
        raise cause or error
    stderr.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
    return 1


def _internal(error: BaseException) -> int:
    if _state["debug"]:
        raise error
    stderr.print(f"[red]internal error:[/red] {type(error).__name__}: {escape(str(error))} "
                 "(run again with --debug for the traceback)", soft_wrap=True)
    return 1


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While the app runs, SIGTERM raises KeyboardInterrupt like Ctrl-C, so every `finally`
    (temporary folders, staged files, training checkpoints) runs before the process ends.
    Signals can be handled only on the main thread; elsewhere (tests) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
