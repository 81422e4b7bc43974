"""The one exception type a user ever sees.

Every user error (bad params, bad data, bad archive, unreachable server) is raised as
:class:`UnetopsError` with a one-line message of the form ``<file or key>: <rule broken>``; the
CLI prints it as ``unetops: error: …`` and exits with code 1, without a traceback.
"""


class UnetopsError(Exception):
    """A user-facing error whose message is a single line naming the file (or key) and the rule."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
