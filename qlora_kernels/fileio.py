"""Writing files safely: ``atomic_write``, used by checkpoints, adapters, the demo's reports
and the benchmarks' result files, and ``make_temp_dir`` for writes of a whole directory
(filled, then renamed into place).

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
        set_usual_file_mode(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once).

    Example:
        >>> 0 <= current_umask() <= 0o777
        True
    """
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_usual_file_mode(path: str) -> None:
    """Give a file the mode ``open`` would (0666 less umask): ``mkstemp`` and safetensors'
    ``save_file`` create theirs 0600, which other users of a shared model directory could
    not read.

    Example:
        >>> import os, stat, tempfile
        >>> fd, p = tempfile.mkstemp(); os.close(fd); set_usual_file_mode(p)
        >>> stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~current_umask()
        True
    """
    os.chmod(path, 0o666 & ~current_umask())


def save_safetensors(tensors: dict, path: str, metadata: dict = None) -> None:
    """safetensors' ``save_file`` with the usual file mode (``set_usual_file_mode``).

    Example:
        >>> import os, stat, tempfile, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_safetensors({"w": torch.ones(2)}, p, {"format": "pt"})
        >>> stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~current_umask()
        True
    """
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    set_usual_file_mode(path)


def make_temp_dir(parent: str, prefix: str, suffix: str = "") -> str:
    """A new empty directory in ``parent`` (``tempfile.mkdtemp``) with the usual permissions
    (0777 less umask) instead of mkdtemp's 0700, for a directory that is filled and then
    renamed into place: the result must be as readable as a directory made by ``mkdir``.

    Example:
        >>> import os, stat, tempfile
        >>> d = make_temp_dir(tempfile.mkdtemp(), ".x-")
        >>> stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~current_umask()
        True
    """
    path = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
    os.chmod(path, 0o777 & ~current_umask())
    return path
