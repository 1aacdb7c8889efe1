"""Checkpoint bytes that transformers leaves in the process's memory.

transformers 5 reads a safetensors checkpoint through one private memory map per shard,
kept open for the whole load, and hands each tensor out as a view of that map. Every
page a tensor's read touches then stays in the process's resident set until the map is
closed, so quantizing weight after weight still ends with the whole dense checkpoint
resident (as file-backed pages), and the tensors the model keeps as they are
(embeddings, norms, the output layer) keep their shard mapped afterwards, tied to a file
that may later be rewritten. ``release_pages`` drops a tensor's pages from the process
once the tensor has been consumed (the bytes stay in the page cache; reading the view
again faults them back in from the file, unchanged); ``copy_out_of_files`` moves what the
model keeps into ordinary memory. Both act only on private file mappings (Linux
``/proc/self/maps``), never on anonymous memory, where dropping pages would zero them.

Example:
    >>> import torch
    >>> file_mapping(torch.ones(4)) is None  # ordinary memory
    True
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import sys
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import nn

_MADV_DONTNEED = 4
_PAGE = 4096
_libc = None


def _file_mappings() -> List[Tuple[int, int, str]]:
    """(start, end, path) of each private file mapping of this process, sorted by start."""
    if not sys.platform.startswith("linux"):
        return []
    maps = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/"):
                    start, end = fields[0].split("-")
                    maps.append((int(start, 16), int(end, 16), fields[5].rstrip("\n")))
    except OSError:
        return []
    return sorted(maps)


def _find(maps: List[Tuple[int, int, str]], ptr: int, nbytes: int) -> Optional[str]:
    i = bisect.bisect_right(maps, (ptr, float("inf"), "")) - 1
    if i >= 0 and maps[i][0] <= ptr and ptr + nbytes <= maps[i][1]:
        return maps[i][2]
    return None


def _bytes(tensor: torch.Tensor) -> Tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def file_mapping(tensor: torch.Tensor) -> Optional[str]:
    """The file whose private memory map holds ``tensor``'s storage, or None (ordinary
    memory, another device, or a platform without ``/proc/self/maps``).

    Example:
        >>> file_mapping(torch.zeros(3)) is None
        True
    """
    if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() == 0:
        return None
    return _find(_file_mappings(), *_bytes(tensor))


def _madvise_dontneed(start: int, end: int) -> int:
    global _libc
    start = -(-start // _PAGE) * _PAGE  # whole pages only: a neighbour's page stays
    end = end // _PAGE * _PAGE
    if end <= start:
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED):
        return 0  # advice refused: the pages simply stay
    return end - start


def release_pages(tensor: torch.Tensor, maps: Optional[list] = None) -> int:
    """Drop the whole pages of ``tensor``'s storage from this process when they belong to a
    private file mapping (``madvise(MADV_DONTNEED)``); returns the bytes released (0 for
    ordinary memory). The pages were only read, so a later read of the view refills them
    from the file with the same bytes.

    Example:
        >>> release_pages(torch.randn(1024))  # ordinary memory: left alone
        0
    """
    if tensor.device.type != "cpu":
        return 0
    ptr, nbytes = _bytes(tensor)
    if nbytes == 0 or _find(maps if maps is not None else _file_mappings(), ptr, nbytes) is None:
        return 0
    return _madvise_dontneed(ptr, ptr + nbytes)


def mapped_files() -> FrozenSet[Tuple[int, int, str]]:
    """This process's private file mappings now, as (start, end, path): taken before a
    load, it tells ``release_new_mappings`` which mappings the load opened.

    Example:
        >>> isinstance(mapped_files(), frozenset)
        True
    """
    return frozenset(_file_mappings())


def release_new_mappings(before: FrozenSet[Tuple[int, int, str]],
                         suffix: str = ".safetensors") -> int:
    """Drop the resident pages of every private mapping of a ``suffix`` file that is not in
    ``before`` (the shards the load in progress opened); returns the bytes advised. Only
    that load's tensors view those mappings, and none was written, so a later read
    refills a page from the file with the same bytes. The weight handed to the quantizer
    may be a cast copy of its mapped bytes: releasing the mappings covers that case too.

    Example:
        >>> release_new_mappings(mapped_files())  # nothing opened since
        0
    """
    return sum(_madvise_dontneed(start, end) for start, end, path in _file_mappings()
               if path.endswith(suffix) and (start, end, path) not in before)


def copy_out_of_files(model: nn.Module) -> int:
    """Replace each parameter and buffer of ``model`` that is a view of a file mapping by a
    copy in ordinary memory (tied tensors stay one tensor), releasing the mapped pages one
    tensor at a time; returns the bytes copied.

    Example:
        >>> copy_out_of_files(torch.nn.Linear(4, 4))  # nothing mapped
        0
    """
    maps = _file_mappings()
    if not maps:
        return 0
    copies: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, copy): old stays
    copied = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or t.device.type != "cpu":
                    continue
                if id(t) not in copies:
                    if _find(maps, *_bytes(t)) is None:
                        continue
                    data = t.detach().clone()
                    new = nn.Parameter(data, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else data
                    for key, value in vars(t).items():  # e.g. _is_hf_initialized
                        setattr(new, key, value)
                    copies[id(t)] = (t, new)  # alive until the end, so no id is reused
                    copied += data.nbytes
                    release_pages(t, maps)
                table[name] = copies[id(t)][1]
    return copied
