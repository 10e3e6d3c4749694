"""The one exception type for problems a user can fix."""

from __future__ import annotations


class CellP2PError(Exception):
    """A user-fixable problem; the message names the file and the fix in one line."""
