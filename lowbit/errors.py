"""The one exception type users see.

Every error that a user can cause (bad path, bad recipe, short calibration text...) is raised as
:class:`LowbitError` with a one-line message; the CLI prints that line and exits non-zero, with no
traceback unless ``--debug`` is given. Anything else reaching the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class LowbitError(Exception):
    """A user-facing error whose message is one readable line."""
