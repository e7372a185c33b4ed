"""The errors a user can fix. Each of the project's error classes (a missing store, a bad manifest value, a
checkpoint of another task, ...) derives from :class:`UserError`; ``vpipe`` prints one as a single line
``vpipe COMMAND: MESSAGE`` and exits with status 1, the traceback only with ``--debug`` or ``VPIPE_DEBUG=1``."""

from __future__ import annotations


class UserError(Exception):
    """Something the person running the pipeline can fix; the message names the file or option and what
    to run or change."""
