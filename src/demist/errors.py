"""The one exception type a user of demist sees.

A `DemistError` means the user gave something demist cannot use (a missing file, a bad config key, images that do
not overlap). The CLI prints its message on one line and exits non-zero; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class DemistError(Exception):
    """A user's mistake, described in one line: what was given, and what was expected."""
