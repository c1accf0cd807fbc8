"""charrnn's one native kernel, `csrc/lstm_int8.c`: built with the system's C compiler the first
time a process asks for it, then loaded with ctypes.

Why C: the int8 step's gate math (`quantized.py`) in torch ops is eleven calls over (B, 4H)
slices a layer, which at 64 rows cost more than its int8 GEMMs; the kernel does it in one
vectorised pass. Why built per process rather than shipped: `-march=native` compiles for the CPU
that runs it, and the build takes about half a second, so nothing is cached or shared between
machines. The AMX step shares out its rows over helper threads of its own (`csrc/blocks.h`);
the path without AMX splits them with OpenMP over torch's threads: torch's wheels bring their own
`libgomp.so.1`, and the kernel's reference to that name binds to the copy already loaded, so the
two share one runtime and one thread count (`torch.set_num_threads`).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from charrnn.errors import CharrnnError

SOURCE = Path(__file__).parent / "csrc" / "lstm_int8.c"


class NativeBuildError(CharrnnError):
    """The int8 kernel cannot be built here: no C compiler, or it refused every flag set."""


def compiler() -> str | None:
    """`$CC`, else the first of cc, gcc and clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def flag_sets() -> list[list[str]]:
    """Compiler flags, best first; the next set is tried when a compiler refuses one.

    The source is compiled to an object, then linked on its own: math flags at link time make
    gcc add start-up code that turns on flush-to-zero for the whole process, and denormals
    elsewhere (a top_p of 1e-320, say) silently became 0. In the kernel, reciprocal estimates
    instead of divisions (-mrecip, which needs the unsafe-math flags) made the gate pass 15%
    faster; its inputs are finite sums and logits."""
    base = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-pthread"]
    native = ["-march=native"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # gcc picks 256-bit vectors by default, half as fast here
        native += ["-mprefer-vector-width=512", "-funsafe-math-optimizations", "-ffinite-math-only",
                   "-mrecip"]
    return [base + native + ["-fopenmp"],  # rows over torch's threads
            base + native + ["-fopenmp-simd"],  # no OpenMP runtime: one thread
            base + ["-fopenmp-simd"]]  # a compiler that cannot target this CPU by name


def _run(cmd: list[str]) -> str | None:
    """None when `cmd` succeeded, else the last line it printed (the compiler's complaint)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


def kernel() -> ctypes.CDLL:
    """The loaded kernel, built on the first call in this process (about half a second)."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = _build()
        return _lib


def _build() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise NativeBuildError(
            "precision int8 builds a small C kernel on first use and needs a C compiler (cc, gcc "
            "or clang on PATH, or $CC); none was found: install one, or use precision fp32 or bf16")
    refused = ""
    with tempfile.TemporaryDirectory(prefix="charrnn-native-") as tmp:
        obj, out = Path(tmp) / "lstm_int8.o", Path(tmp) / "lstm_int8.so"
        for flags in flag_sets():
            openmp = ["-fopenmp"] if "-fopenmp" in flags else []  # links libgomp
            refused = (_run([cc, *flags, "-c", str(SOURCE), "-o", str(obj)])
                       or _run([cc, "-shared", "-pthread", *openmp, str(obj), "-o", str(out)]))
            if refused is None:
                lib = ctypes.CDLL(str(out))  # mapped now: the file may go with the directory
                break
        else:
            raise NativeBuildError(f"precision int8: {cc} could not build {SOURCE.name} ({refused}); "
                                   "use precision fp32 or bf16")
    P, Int, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.lstm_layer_int8.argtypes = [Int, Int, Int, P, Int, P, P, P, I64, Int, P, P, P, Int, P, Int]
    lib.lstm_layer_int8.restype = Int
    lib.dequantize.argtypes, lib.dequantize.restype = [Int, Int, P, Int, P, P, P], None
    lib.sample_rows.argtypes, lib.sample_rows.restype = [Int, Int, P, P, P, P, I64, P, P], None
    lib.amx_init.argtypes, lib.amx_init.restype = [], Int
    lib.amx_gemm.argtypes, lib.amx_gemm.restype = [Int, Int, Int, P, P, P], None
    lib.lstm_step_amx.argtypes = [ctypes.POINTER(StepArgs)]
    lib.lstm_step_amx.restype = Int
    return lib


class StepArgs(ctypes.Structure):
    """`step_args` of csrc/lstm_int8.c, field for field (see its comments)."""

    _fields_ = [*((name, ctypes.c_int) for name in (
                    "B", "H", "L", "ub", "V", "threads", "K0", "K1", "N", "NV")),
                ("ids", ctypes.c_void_p), ("n_ids", ctypes.c_int64),
                *((name, ctypes.c_void_p) for name in (
                    "w", "scale", "base", "head_bias", "x0", "xh", "acc", "head_acc",
                    "h_in", "c_in", "h_out", "c_out", "logits"))]
