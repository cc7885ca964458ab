"""Calls into native libraries that can fail loudly: a Rust panic (pyo3's `PanicException`, a
`BaseException`) instead of an exception, with its own message and backtrace written straight
to the process's stderr, past Python.

`call_native` turns such a failure into an ordinary exception with a one-line message, and
holds back what the library printed meanwhile, so the user sees our one-line error only.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_KEPT_OUTPUT = 1 << 16
"""Bytes of a successful call's stderr passed on (warnings), so a chatty library cannot flood it."""


class NativeCallFailed(Exception):
    """A native library raised or panicked; the message is the first line of its own."""


def call_native(function: Callable[..., T], *args: object) -> T:
    """`function(*args)`, with any failure (a panic included, Ctrl-C excepted) as `NativeCallFailed`.

    File descriptor 2 goes to a temporary file during the call: on success what was written
    there is passed on to stderr, on failure it is dropped with the panic's backtrace.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failure: BaseException | None = None
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            result = function(*args)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # pyo3's PanicException derives from BaseException
            failure = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        printed = sink.read(_KEPT_OUTPUT)
    if failure is not None:
        lines = str(failure).strip().splitlines() or [type(failure).__name__]
        raise NativeCallFailed(lines[0]) from None
    if printed:
        sys.stderr.write(printed.decode("utf-8", errors="replace"))
    return result
