"""Build and call the CUDA kernels of csrc/cuda on the host, under csrc/emulation.

``load()`` compiles the ``.cu`` files as C++ with g++ (``-O2 -x c++``) against the emulation
headers, links them with the runtime and the C entry points (csrc/emulation/emu_capi.cpp)
into one shared library, and opens it with ctypes. The library is cached under a hash of
every source it is built from, the flags and the compiler's version, so an edited kernel is
always rebuilt. The kernel objects' ``.bss`` (where their static ``__shared__`` arrays live,
and nothing else) is renamed to the section the runtime poisons at each block start.

The wrappers take and return torch CPU tensors; every output is written into a buffer with
guard bytes on both sides, checked after the call, so an out-of-bounds write fails the test
instead of corrupting the process.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = ROOT / "csrc" / "emulation"
INCLUDE_DIR = ROOT / "csrc" / "include"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
CXX = shutil.which(os.environ.get("CXX", "g++"))
# -ffp-contract=off as nvcc --fmad=false; __CUDA_ARCH__ selects the device branches of the
# shared headers (qk_format.h, qk_adamw.h: __fmul_rn & co.) as nvcc's device pass does; the
# fiber switches need fortify's longjmp check off.
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=off", "-D__CUDA_ARCH__=900",
         "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0", "-Wall", "-Wno-unknown-pragmas",
         f"-I{EMU_DIR / 'include'}", f"-I{EMU_DIR}", f"-I{CUDA_DIR}", f"-I{INCLUDE_DIR}"]
SHARED_SECTION = "qk_emu_shared"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_TYPE_CODE = {"nf4": 0, "fp4": 1, "int4": 2}
GUARD = 64  # bytes on each side of an output buffer
GUARD_BYTE = 0xA5


def _inputs() -> list[Path]:
    files = [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), *CUDA_DIR.glob("*.h"),
             *INCLUDE_DIR.glob("*.h"), *EMU_DIR.rglob("*.h"), *EMU_DIR.rglob("*.cpp")]
    return sorted(files)


def build_key() -> str:
    """Hash of the sources, flags and compiler: the cache key of the library."""
    h = hashlib.sha256()
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode() + "\0".join(FLAGS).encode())
    for f in _inputs():
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:24]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def build(cache_root: Path | None = None) -> Path:
    """The emulated kernel library, built unless the cache holds one for these sources."""
    if cache_root is None:
        cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
            "qlora_kernels" / "cuda-emulation"
    lib = cache_root / build_key() / "libqk_emu.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        kernels = [(src, ["-x", "c++"]) for src in KERNEL_SOURCES] + \
                  [(EMU_DIR / "emu_capi.cpp", [])]
        runtime = Path(tmp) / "cuda_emu.o"
        jobs = [[CXX, *FLAGS, *lang, "-c", str(src), "-o", str(Path(tmp) / f"{src.stem}.o")]
                for src, lang in kernels]
        jobs.append([CXX, *FLAGS, "-c", str(EMU_DIR / "cuda_emu.cpp"), "-o", str(runtime)])
        with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
            list(pool.map(_run, jobs))
        objects = []
        for src, _ in kernels:  # their .bss holds only the static __shared__ arrays
            obj = Path(tmp) / f"{src.stem}.o"
            _run(["objcopy", "--rename-section", f".bss={SHARED_SECTION}", str(obj)])
            objects.append(str(obj))
        out = Path(tmp) / "libqk_emu.so"
        _run([CXX, "-shared", "-o", str(out), str(runtime), *objects])
        _check_shared_section(out)
        os.replace(out, lib)  # atomic: a half-written library is never loaded
    return lib


def _symbols(lib: Path) -> list[tuple[int, str, int, str]]:
    """(value, section, size, name) of every symbol of the library (objdump -t)."""
    rows = []
    for line in _run(["objdump", "-t", str(lib)]).splitlines():
        parts = line.split()
        if len(parts) >= 5 and re.fullmatch(r"[0-9a-f]{8,}", parts[0]):
            try:
                rows.append((int(parts[0], 16), parts[-3], int(parts[-2], 16), parts[-1]))
            except ValueError:
                continue
    return rows


def _check_shared_section(lib: Path) -> None:
    """Only function-local statics (the kernels' __shared__ arrays) may be poisoned."""
    names = [name for _, section, _, name in _symbols(lib) if section == SHARED_SECTION]
    others = [n for n in names
              if not n.startswith(("_ZZ", "__start_", "__stop_")) and n != SHARED_SECTION]
    if not names or others:
        raise RuntimeError(f"unexpected symbols in {SHARED_SECTION}: {others or 'none at all'}")


def static_shared_bytes(lib: Path) -> dict[str, int]:
    """Kernel symbol -> bytes of its static __shared__ arrays (function-local statics are
    named _ZZ<the function's encoding>E<length><name>)."""
    sizes: dict[str, int] = {}
    for _, section, size, name in _symbols(lib):
        m = re.fullmatch(r"_ZZ(.+)E(\d+)(\w+)", name)
        if section == SHARED_SECTION and m and len(m.group(3)) == int(m.group(2)):
            fn = "_Z" + m.group(1)
            sizes[fn] = sizes.get(fn, 0) + size
    return sizes


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_D = ctypes.c_double
_SIGNATURES = {
    "qk_emu_configure": ([_INT, ctypes.c_uint64], None),
    "qk_emu_register_static_smem": ([_P, _INT], None),
    "qk_emu_last_error": ([], ctypes.c_char_p),
    "qk_emu_launch_log": ([], ctypes.c_char_p),
    "qk_emu_clear_log": ([], None),
    "qk_emu_quantize_4bit": ([_P, _INT, _I64, _INT, _INT, _P, _P], _INT),
    "qk_emu_dequantize_4bit": ([_P, _P, _P, _P, _P, ctypes.c_float, _P, _I64, _INT, _INT, _P],
                               _INT),
    "qk_emu_quantize_8bit": ([_P, _INT, _I64, _I64, _P, _P, _P], _INT),
    "qk_emu_dequantize_8bit": ([_P, _P, _P, _I64, _I64, _INT, _P], _INT),
    "qk_emu_gemv_4bit": ([_P, _INT, _I64, _I64, _I64, _P, _P, _P, _P, _P, ctypes.c_float, _P,
                          _INT, _P, _P], _INT),
    "qk_emu_adamw32": ([_INT, _P, _P, _P, _P, _I64, _D, _D, _D, _D, _D, _I64, _INT], _INT),
    "qk_emu_adamw32_multi": ([_INT, _I64, _P, _P, _P, _P, _P, _P, _D, _D, _D, _D, _D, _INT],
                             _INT),
    "qk_emu_adamw8bit": ([_INT, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _D, _D, _D, _D, _D, _I64,
                          _INT], _INT),
    "qk_emu_probe_launch": ([ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, _I64,
                             _INT, _P], _INT),
}


class EmulatedCuda:
    """ctypes front of the library: configure(), call(name, *args), the launch log."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, res
        # The kernels' static shared memory, by address: load base + symbol value.
        symbols = {name: value for value, section, _, name in _symbols(lib_path)
                   if section.startswith(".text")}
        base = ctypes.cast(self.lib.qk_emu_configure, ctypes.c_void_p).value - \
            symbols["qk_emu_configure"]
        self.static_smem = static_shared_bytes(lib_path)
        for fn, size in self.static_smem.items():
            self.lib.qk_emu_register_static_smem(base + symbols[fn], size)

    def configure(self, sm: int, seed: int) -> None:
        """Emulate the limits of sm_<sm>; threads of a block run in an order drawn from seed."""
        self.lib.qk_emu_configure(sm, seed)

    def call(self, name: str, *args) -> None:
        """Runs qk_emu_<name>; raises with the emulation's message if the launch failed."""
        self.lib.qk_emu_clear_log()
        err = getattr(self.lib, f"qk_emu_{name}")(*args)
        if err != 0:
            raise RuntimeError(f"{name}: cudaError {err}: "
                               f"{self.lib.qk_emu_last_error().decode()}")

    def launches(self) -> list[str]:
        """One line per kernel launch of the last call: name, grid, block and shared memory."""
        return self.lib.qk_emu_launch_log().decode().splitlines()


def ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class Guarded:
    """A tensor of `numel` elements of `dtype` placed `offset` bytes past a 64-byte-aligned
    address, between guard bytes; check() asserts nothing outside it was written."""

    def __init__(self, numel: int, dtype: torch.dtype, offset: int = 0, fill: float = 0.0):
        size = torch.empty(0, dtype=dtype).element_size()
        assert offset % size == 0, "the offset must keep the element alignment"
        self.nbytes = numel * size
        self.start = GUARD + offset
        self.buf = torch.full((self.start + self.nbytes + GUARD,), GUARD_BYTE, dtype=torch.uint8)
        self.tensor = self.buf[self.start:self.start + self.nbytes].view(dtype)
        self.tensor.fill_(fill)

    def check(self) -> torch.Tensor:
        head, tail = self.buf[:self.start], self.buf[self.start + self.nbytes:]
        assert bool((head == GUARD_BYTE).all()) and bool((tail == GUARD_BYTE).all()), \
            "the kernel wrote outside its output buffer"
        return self.tensor


def placed(t: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """A copy of t (flattened) at `offset` bytes past a 64-byte-aligned address."""
    g = Guarded(t.numel(), t.dtype, offset)
    g.tensor.copy_(t.reshape(-1))
    return g.tensor
