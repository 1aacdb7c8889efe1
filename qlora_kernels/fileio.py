"""Writing files safely: ``atomic_write``, used by checkpoints, adapters, the demo's reports
and the benchmarks' result files.

Example:
    >>> import os, tempfile
    >>> from qlora_kernels.fileio import atomic_write
    >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> atomic_write(p, lambda tmp: open(tmp, "w").write("ok")); open(p).read()
    'ok'
"""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``:
    an interrupted write never leaves a half-written file, and the old file stays intact
    until the new one is complete. The file gets the usual permissions (0666 less umask).

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x.txt")
        >>> atomic_write(p, lambda tmp: open(tmp, "w").write("hi")); open(p).read()
        'hi'
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
