"""The one exception type that reaches a user as a one-line message.

Anything the user can fix (a missing file, an unsupported checkpoint, a prompt that does not fit)
is raised as `UserError`; the CLI prints `error: <message>` and exits non-zero. Any other
exception is a bug and is reported as one (with the traceback only when INTERNVL_EDGE_DEBUG=1).
"""


class UserError(Exception):
    """A problem with the user's input or environment, worded so the user can act on it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the caller wrote
        self.exit_code = exit_code


def reason(e: BaseException) -> str:
    """What went wrong with a file, in words: an OSError's text without its errno and repeated path,
    a JSON error's position, else the first line of the message."""
    import json

    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
