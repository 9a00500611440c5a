"""The one exception type for user errors.

A user error is anything the user can fix: a missing or unreadable file, an unsupported format, a box outside
the image, an unknown model name, a checkpoint that does not match. Its message is one line that names the
file or argument and says what to do. The CLI prints it and exits with status 2. Internal bugs raise anything
else and keep their traceback.
"""

from __future__ import annotations


class ImedsamError(Exception):
    """A user error: one line naming the file/argument and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
