"""Errors a user can act on.

Everything the CLI prints as a one-line message derives from `StarFlowError`; any other
exception is a bug and shows its traceback under `--debug`.
"""


class StarFlowError(Exception):
    """A problem with the user's input, files or environment; the message says how to fix it."""


class ConfigError(StarFlowError):
    """A config file is missing, malformed, of another version, or asks for an unsupported switch."""


class WeightsError(StarFlowError):
    """Checkpoint keys or shapes do not match what the config describes."""


class ModelNotFound(StarFlowError):
    """No model at the given path, cache entry or repository id."""


class InputError(StarFlowError):
    """An input file (image, prompt list, data folder) is missing or unreadable."""


def listing(names: list[str], limit: int = 10) -> str:
    """A bounded, readable list of names for a one-line error message."""
    if not names:
        return "none"
    return "[" + ", ".join(names[:limit]) + (f", … {len(names)} in all" if len(names) > limit else "") + "]"
