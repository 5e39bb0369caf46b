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
