"""The one exception type for problems a user can fix, and the one line for an OSError."""

from __future__ import annotations

import errno
import re


class CellP2PError(Exception):
    """A user-fixable problem; the message names the file and the fix in one line."""


def is_disk_full(err: BaseException) -> bool:
    """Whether an error means the disk (or quota) is full, however the writer words it.

    numpy's ``tofile`` (under tifffile) reports a short write as "65536 requested and 65444
    written", with no errno; torch's zip writer as a RuntimeError ("unexpected pos ...").
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return bool(
        re.search(r"\d+ requested and \d+ written", text)
        or "no space left" in text
        or "quota exceeded" in text
    )


_OS_ERROR_HINTS = {
    errno.EACCES: "permission denied; check its permissions or choose another path",
    errno.EPERM: "permission denied; check its permissions or choose another path",
    errno.EROFS: "read-only file system; choose another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder; give a file",
    errno.ENOENT: "no such file or folder; check the path",
}


def os_error_line(err: OSError) -> str:
    """One line for an OSError the library did not foresee: the file it names, what to do."""
    where = next((f for f in (err.filename, err.filename2) if f is not None), "a file")
    if is_disk_full(err):
        return f"{where}: disk full ({err.strerror or err}); free space or choose another folder"
    what = _OS_ERROR_HINTS.get(err.errno) or f"{err.strerror or err}; check the path"
    return f"{where}: {what}"
