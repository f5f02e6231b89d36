"""Launching emulated kernels from Python, with the checks a GPU does not give.

Per launch:

1. Arguments are checked against the parameter types the compiler resolved: an array for a
   pointer (C-contiguous, element type equal to the pointee), a NumPy scalar of exactly the
   parameter's type for a scalar.  CuPy passes whatever it is given; a float64 where the
   kernel reads an int is a silent wrong answer on a GPU, a TypeError here.
2. Every array is copied into a larger buffer with guard zones of 0xFF bytes (NaN for any
   float, so out-of-bounds reads show up as NaN) before and after it, at the same address
   modulo 256 as the original, so alignment-dependent paths (float4 loads) are the ones a GPU
   would take.  The same array passed twice shares one copy; partly overlapping arrays are
   refused.  After the launch the guards are checked (out-of-bounds writes) and the data
   copied back.
3. Arrays made by ``empty`` hold a poison bit pattern (a signalling NaN no arithmetic
   produces); an argument that still holds it after the launch is an element the kernel never
   wrote (or, for a read-only argument, one it read before anyone wrote it).
4. With GPUBACKPROP_EMU_GUARD_CHECK=1 every launch runs twice, the second time with guard
   zones of 0x7F bytes (3.4e38 as a float, 1.4e306 as a double: finite, so that max, min and
   comparisons cannot ignore them the way fmaxf ignores a NaN); an output that differs between
   the two runs was computed from memory outside the arguments: a read out of bounds.
5. What a GPU would stop with an error stops the launch with EmuLaunchError, never the Python
   process: a fault in kernel code (SIGSEGV, SIGBUS, SIGFPE, SIGILL: an access beyond the guard
   zones, a null pointer, an integer division by zero, a fiber stack overflow) and a
   misaligned float2/float4/double2/... load or store.  The message names the block, thread,
   signal and address (and the argument nearest to it); the guarded copies are discarded, so
   the arrays passed are left as they were, and the next launch starts afresh.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GUARD_BYTES = 64 * 1024
GUARD_BYTE = 0xFF
SECOND_GUARD_BYTE = 0x7F  # the guard-check run's pattern (see the module docstring, item 4)
ALIGNMENT_KEPT = 256
ERROR_BUFFER = 4096
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_DYNAMIC_SHARED = 48 * 1024  # above this CUDA needs cudaFuncAttributeMaxDynamicSharedMemorySize
STACK_KIB_RANGE = (16, 1024 * 1024)  # GPUBACKPROP_EMU_STACK_KIB, read by cuda_emu_runtime.h

# Signalling NaNs with a distinctive payload: arithmetic never yields them (it quiets NaNs).
POISON32 = np.uint32(0x7FA5A5A5)
POISON64 = np.uint64(0x7FF5A5A5A5A5A5A5)

_launch_lock = threading.Lock()  # the scheduler's state is global per library

# NumPy scalar type for each parameter type code (the elementwise wrapper converts with it too).
SCALAR_TYPES = {
    "f4": np.float32,
    "f8": np.float64,
    "i1": np.int8,
    "u1": np.uint8,
    "i2": np.int16,
    "u2": np.uint16,
    "i4": np.int32,
    "u4": np.uint32,
    "i8": np.int64,
    "u8": np.uint64,
    "b1": np.bool_,
    "f2": np.float16,  # __half (cuda_fp16.h)
}
_C_NAMES = {
    "f4": "float",
    "f8": "double",
    "i1": "signed char",
    "u1": "unsigned char",
    "i2": "short",
    "u2": "unsigned short",
    "i4": "int",
    "u4": "unsigned int",
    "i8": "long long",
    "u8": "unsigned long long",
    "b1": "bool",
    "v0": "void",
    "f2": "__half",
    "bf2": "__nv_bfloat16",
}
# dtypes an array may have for a pointer to __nv_bfloat16: its bit patterns, or a bfloat16 dtype
# (ml_dtypes, as JAX uses).
BFLOAT16_DTYPE_NAMES = ("uint16", "int16", "bfloat16")


class EmuLaunchError(RuntimeError):
    """A kernel misbehaved in a way the emulator detects (out-of-bounds write, unwritten
    output, divergent barrier, trap/assert, a fault or misaligned vector access in kernel
    code).  The message names kernel, grid, block and buffer or faulting thread."""


@dataclass(frozen=True)
class Param:
    name: str
    pointer: bool
    const: bool
    code: str  # f4, i8, ..., f2 (__half), bf2 (__nv_bfloat16), v0 (void), x<size> (struct)

    @property
    def c_type(self) -> str:
        base = _C_NAMES.get(self.code, f"struct of {self.code[1:]} bytes")
        if self.pointer:
            return ("const " if self.const else "") + base + "*"
        return base


@dataclass
class Kernel:
    name: str
    params: tuple[Param, ...]
    entry: Any  # ctypes function
    # Launch with float32 subnormals flushed to zero (see EmuModule), through `configure`.
    flush_denormals: bool = False
    configure: Any = None


class EmuModule:
    """A compiled kernels/ source: its kernels by name, loaded from a shared library.

    ``flush_denormals``: the GPU build's flags flush float32 subnormals to zero (-ftz=true, which
    CuPy always passes).  The CPU's flush bits (MXCSR FTZ/DAZ) act on double as well, which a GPU
    never flushes; so a kernel runs flushed when the module is and none of its parameters is a
    double or a pointer to double (a float32 build), and unflushed otherwise.
    """

    def __init__(
        self, path: Path, label: str, decls: list[Any], flush_denormals: bool = False
    ) -> None:
        self.path = path
        self.label = label
        self.flush_denormals = flush_denormals
        self.library = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls
        configure = self.library.gbemu_set_flush_denormals
        configure.restype = None
        configure.argtypes = [ctypes.c_int]
        self.kernels: dict[str, Kernel] = {}
        for decl in decls:
            signature_fn = getattr(self.library, f"gbemu_signature_{decl.symbol}")
            signature_fn.restype = ctypes.c_char_p
            codes = signature_fn().decode().split()
            names = list(decl.param_names)
            names += [f"arg{i}" for i in range(len(names), len(codes))]
            params = tuple(
                Param(names[i], code[0] == "p", code[1] == "c", code[2:])
                for i, code in enumerate(codes)
            )
            entry = getattr(self.library, f"gbemu_launch_{decl.symbol}")
            entry.restype = ctypes.c_int
            entry.argtypes = [
                ctypes.POINTER(ctypes.c_longlong),
                ctypes.c_longlong,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_ulonglong,
                ctypes.c_char_p,
                ctypes.c_int,
            ]
            flush = flush_denormals and not any(p.code == "f8" for p in params)
            self.kernels[decl.name] = Kernel(decl.name, params, entry, flush, configure)

    def __repr__(self) -> str:
        return f"EmuModule({self.label!r}, kernels={sorted(self.kernels)})"


def poison_fill(array: np.ndarray) -> None:
    """Fill ``array`` with the poison pattern of its element size (0xA5 bytes if not 4 or 8)."""
    flat = array.reshape(-1).view(np.uint8)
    if array.dtype.itemsize == 4:
        flat.view(np.uint32)[:] = POISON32
    elif array.dtype.itemsize == 8:
        flat.view(np.uint64)[:] = POISON64
    else:
        flat[:] = 0xA5


def poison_count(data: np.ndarray, itemsize: int) -> tuple[int, int]:
    """(number of poisoned elements, index of the first) in raw bytes ``data``."""
    if itemsize == 4:
        hits = data.view(np.uint32) == POISON32
    elif itemsize == 8:
        hits = data.view(np.uint64) == POISON64
    else:
        return 0, -1  # 1- and 2-byte values: the pattern is an ordinary value
    count = int(np.count_nonzero(hits))
    return count, (int(np.argmax(hits)) if count else -1)


def shuffle_seed_from_env() -> int:
    """GPUBACKPROP_EMU_SHUFFLE=<seed>: run the blocks of the grid in a shuffled order, and the
    threads of a block in a shuffled order between barriers (a different order per block and
    per pass), to expose races."""
    value = os.environ.get("GPUBACKPROP_EMU_SHUFFLE", "").strip()
    if not value or value == "0":
        return 0
    try:
        return int(value) or 1
    except ValueError:
        raise ValueError(
            f"GPUBACKPROP_EMU_SHUFFLE={value!r} is not an integer seed (0 or unset: no shuffling)"
        ) from None


def check_stack_setting() -> None:
    """GPUBACKPROP_EMU_STACK_KIB=<KiB>: the stack of each emulated thread (default 256)."""
    value = os.environ.get("GPUBACKPROP_EMU_STACK_KIB", "").strip()
    if not value:
        return
    low, high = STACK_KIB_RANGE
    if not (value.isdigit() and low <= int(value) <= high):
        raise ValueError(
            f"GPUBACKPROP_EMU_STACK_KIB={value!r} is not a stack size; expected a whole number "
            f"of KiB from {low} to {high} (unset: 256)"
        )


def _dims(value: Any, what: str, limits: tuple[int, int, int], where: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value), 1, 1)
    dims = tuple(int(v) for v in value) + (1,) * (3 - len(tuple(value)))
    too_big = any(d > m for d, m in zip(dims, limits, strict=False))
    if len(dims) != 3 or any(d < 1 for d in dims) or too_big:
        raise ValueError(
            f"{where}: {what}={tuple(value)} is not a launch size; expected 1 to 3 positive "
            f"integers at most {limits}"
        )
    return dims  # type: ignore[return-value]


class _Group:
    """One guarded copy shared by every argument that is the same array."""

    def __init__(self, array: np.ndarray, guard_byte: int = GUARD_BYTE) -> None:
        self.array = array
        self.guard_byte = guard_byte
        self.nbytes = array.nbytes
        self.itemsize = array.dtype.itemsize
        address = array.ctypes.data
        self.buffer = np.empty(self.nbytes + 2 * GUARD_BYTES + ALIGNMENT_KEPT, np.uint8)
        base = self.buffer.ctypes.data + GUARD_BYTES
        self.offset = GUARD_BYTES + (address - base) % ALIGNMENT_KEPT
        self.buffer[: self.offset] = guard_byte
        self.buffer[self.offset + self.nbytes :] = guard_byte
        self.data = self.buffer[self.offset : self.offset + self.nbytes]
        if self.nbytes:
            self.data[:] = array.reshape(-1).view(np.uint8)
        self.pointer = self.buffer.ctypes.data + self.offset
        self.params: list[Param] = []


def launch(
    module: EmuModule,
    kernel: str,
    grid: Any,
    block: Any,
    args: tuple[Any, ...],
    shared_mem: int = 0,
    shuffle_seed: int | None = None,
    max_shared_mem: int = MAX_DYNAMIC_SHARED,
) -> None:
    """Run ``kernel`` of ``module`` on the emulator; see the module docstring for the checks.
    ``max_shared_mem``: the dynamic shared memory the kernel may ask for (48 KiB unless opted
    in, as CuPy's ``max_dynamic_shared_size_bytes`` does)."""
    if kernel not in module.kernels:
        raise ValueError(
            f'kernel={kernel!r} is not an extern "C" __global__ function or a name expression '
            f"compiled into {module.label}; it has {sorted(module.kernels)} (a template is "
            "launched by the name expression it was compiled with, as in CuPy)"
        )
    info = module.kernels[kernel]
    where = f"kernel {kernel!r} ({module.label})"
    grid3 = _dims(grid, "grid", MAX_GRID, where)
    block3 = _dims(block, "block", MAX_BLOCK, where)
    threads = block3[0] * block3[1] * block3[2]
    if threads > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"{where}: block={block3} has {threads} threads; at most 1024 are allowed")
    shared_mem = int(shared_mem)
    if not 0 <= shared_mem <= max_shared_mem:
        raise ValueError(
            f"{where}: shared_mem={shared_mem} bytes; expected 0 to {max_shared_mem} "
            "(more needs an opt-in function attribute on the GPU)"
        )
    where = f"kernel {kernel!r} (grid={grid3}, block={block3})"
    if len(args) != len(info.params):
        raise TypeError(
            f"{where} takes {len(info.params)} arguments "
            f"({', '.join(p.c_type + ' ' + p.name for p in info.params)}), got {len(args)}"
        )

    seed = shuffle_seed_from_env() if shuffle_seed is None else int(shuffle_seed)
    check_stack_setting()
    run = (info, where, args, grid3, block3, shared_mem, seed)
    groups = _run_once(*run, GUARD_BYTE)
    changed = []
    if guard_check_from_env():
        second = _run_once(*run, SECOND_GUARD_BYTE)
        changed = [
            _describe(group)
            for group, other in zip(groups.values(), second.values(), strict=True)
            if not np.array_equal(group.data, other.data)
        ]

    # The first run's own findings come first; results are copied back unless the guard check
    # found them unreliable.
    problems = []
    for group in groups.values():
        problems += _check_group(group, copy_back=not changed)
    if changed:
        problems.append(
            f"{', '.join(changed)} changed when the guard zones and shared memory held 0x7F "
            "instead of 0xFF bytes: the kernel read out of bounds of an argument, or shared "
            "memory nobody wrote, and used the value; the arguments were left unchanged"
        )
    if problems:
        raise EmuLaunchError(f"{where}: " + "; ".join(problems))


def _run_once(
    info: Any,
    where: str,
    args: tuple[Any, ...],
    grid3: tuple[int, int, int],
    block3: tuple[int, int, int],
    shared_mem: int,
    seed: int,
    guard_byte: int,
) -> dict[tuple[int, int], _Group]:
    """Copy the arguments into guarded buffers and run the kernel on them; return the buffers
    (the caller checks them and copies results back).  A failed launch raises EmuLaunchError."""
    groups: dict[tuple[int, int], _Group] = {}
    holders: list[np.ndarray] = []
    pointers = (ctypes.c_void_p * max(1, len(args)))()
    for index, (param, value) in enumerate(zip(info.params, args, strict=True)):
        if param.pointer:
            array = _check_pointer(where, param, value)
            key = (array.ctypes.data, array.nbytes)
            group = groups.get(key)
            if group is None:
                _check_overlap(where, param, array, groups)
                group = groups[key] = _Group(array, guard_byte)
            group.params.append(param)
            holder = np.array([group.pointer], dtype=np.uintp)
        else:
            holder = _check_scalar(where, param, value)
        holders.append(holder)
        pointers[index] = holder.ctypes.data

    dims = (ctypes.c_longlong * 6)(*grid3, *block3)
    error = ctypes.create_string_buffer(ERROR_BUFFER)
    with _launch_lock:
        # Shared memory is filled with the same byte as the guard zones (read by the runtime).
        os.environ["GBEMU_SHARED_FILL"] = f"{guard_byte:02x}"
        try:
            info.configure(int(info.flush_denormals))
            status = info.entry(dims, shared_mem, pointers, seed, error, ERROR_BUFFER)
        finally:
            del os.environ["GBEMU_SHARED_FILL"]
    if status != 0:
        # The guarded copies are dropped unread: the caller's arrays keep their contents.
        message = error.value.decode(errors="replace")
        raise EmuLaunchError(
            f"{where}: {message}{_nearest_argument(message, groups)}; the arguments were left "
            "unchanged"
        )
    return groups


def flag_from_env(name: str) -> bool:
    """An on/off setting: ``name`` set to 1 (on), 0 or unset (off); anything else is an error."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r}; expected 0 or 1 (unset: 0)")
    return value == "1"


def guard_check_from_env() -> bool:
    """GPUBACKPROP_EMU_GUARD_CHECK=1: run each launch a second time with other guard bytes and
    require identical outputs (catches out-of-bounds reads whose value is used)."""
    return flag_from_env("GPUBACKPROP_EMU_GUARD_CHECK")


def _check_pointer(where: str, param: Param, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"{where}: parameter {param.name!r} is {param.c_type}, got {type(value).__name__} "
            "(pass a NumPy array)"
        )
    if not value.flags.c_contiguous:
        raise TypeError(
            f"{where}: parameter {param.name!r} ({param.c_type}) got a non-contiguous array of "
            f"shape {value.shape} and strides {value.strides}; pass np.ascontiguousarray(...)"
        )
    code = f"{value.dtype.kind}{value.dtype.itemsize}"
    if value.dtype.kind not in "fiub":
        code = f"x{value.dtype.itemsize}"
    if param.code == "bf2":
        if value.dtype.itemsize != 2 or value.dtype.name not in BFLOAT16_DTYPE_NAMES:
            raise TypeError(
                f"{where}: parameter {param.name!r} is {param.c_type}, got an array of dtype "
                f"{value.dtype}; pass the bfloat16 bit patterns as a uint16 array (or an "
                "ml_dtypes.bfloat16 array)"
            )
    elif param.code not in ("v0", code) and not param.code.startswith("x"):
        raise TypeError(
            f"{where}: parameter {param.name!r} is {param.c_type}, got an array of dtype "
            f"{value.dtype} ({_C_NAMES.get(code, code)} elements)"
        )
    if not value.flags.writeable and not param.const:
        raise TypeError(
            f"{where}: parameter {param.name!r} ({param.c_type}) may be written, got a "
            "read-only array"
        )
    return value


def _check_scalar(where: str, param: Param, value: Any) -> np.ndarray:
    if param.code == "bf2":  # a __nv_bfloat16 by value: its bits, as a 2-byte NumPy scalar
        if isinstance(value, np.generic) and value.dtype.name in BFLOAT16_DTYPE_NAMES:
            return np.array([value]).view(np.uint16)
        raise TypeError(
            f"{where}: parameter {param.name!r} is __nv_bfloat16, got {value!r}; pass its bit "
            "pattern as np.uint16(...) (or an ml_dtypes.bfloat16 scalar)"
        )
    expected = SCALAR_TYPES.get(param.code)
    if expected is None:
        raise TypeError(
            f"{where}: parameter {param.name!r} has type {param.c_type}, which "
            "the emulator cannot pass from Python"
        )
    if not isinstance(value, np.generic) or value.dtype != np.dtype(expected):
        got = (
            f"np.{value.dtype.name}"
            if isinstance(value, np.generic)
            else f"{type(value).__name__} {value!r}"
            if not isinstance(value, np.ndarray)
            else f"an array of shape {value.shape}"
        )
        raise TypeError(
            f"{where}: parameter {param.name!r} is {param.c_type}, got {got}; pass "
            f"np.{np.dtype(expected).name}(...)"
        )
    return np.array([value], dtype=expected)


def _check_overlap(where: str, param: Param, array: np.ndarray, groups: dict) -> None:
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    for group in groups.values():
        other_start = group.array.ctypes.data
        other_end = other_start + group.nbytes
        if start < other_end and other_start < end:
            raise ValueError(
                f"{where}: parameter {param.name!r} overlaps parameter {group.params[0].name!r} "
                "without being the same array; pass the same array or disjoint arrays"
            )


_FAULT_ADDRESS = re.compile(r"\bSIG[A-Z]+ \([^)]*\) at address 0x([0-9a-f]+)")


def _nearest_argument(message: str, groups: dict[tuple[int, int], _Group]) -> str:
    """For a fault at an address: which argument's data it is nearest to, and how far."""
    match = _FAULT_ADDRESS.search(message)
    if not match or not groups:
        return ""
    address = int(match.group(1), 16)
    if address < 4096:
        return ""  # a null pointer: no argument is near

    def distance(group: _Group) -> int:
        start = group.pointer
        end = start + group.nbytes
        return start - address if address < start else max(0, address - end)

    group = min(groups.values(), key=distance)
    start, end = group.pointer, group.pointer + group.nbytes
    if address < start:
        offset = f"{start - address} bytes before the start"
    elif address >= end:
        offset = f"{address - end} bytes after the end"
    else:
        offset = f"byte {address - start}"
    return f" (nearest argument: {_describe(group)}, {offset} of its data)"


def _describe(group: _Group) -> str:
    names = "/".join(dict.fromkeys(p.name for p in group.params))
    return f"argument {names!r} ({group.array.dtype}{list(group.array.shape)})"


def _check_group(group: _Group, copy_back: bool = True) -> list[str]:
    """What went wrong with one argument's guarded copy (guard zones, poison, const); its data is
    copied back to the caller's array when writable and ``copy_back``."""
    problems = []
    before = group.buffer[: group.offset]
    after = group.buffer[group.offset + group.nbytes :]
    bad_before = np.flatnonzero(before != group.guard_byte)
    bad_after = np.flatnonzero(after != group.guard_byte)
    if bad_before.size or bad_after.size:
        parts = []
        if bad_before.size:
            first = (int(bad_before[0]) - group.offset) // group.itemsize
            parts.append(f"{bad_before.size} bytes before its start (lowest at element {first})")
        if bad_after.size:
            first = (group.nbytes + int(bad_after[0])) // group.itemsize
            parts.append(
                f"{bad_after.size} bytes after its end (first at element {first}, "
                f"size {group.array.size})"
            )
        problems.append(f"wrote out of bounds of {_describe(group)}: " + " and ".join(parts))
    writable = any(not p.const for p in group.params)
    count, first = poison_count(group.data, group.itemsize) if group.nbytes else (0, -1)
    if count:
        if writable:
            problems.append(
                f"left {count} elements of {_describe(group)} unwritten (first at index {first})"
            )
        else:
            problems.append(
                f"read-only {_describe(group)} holds {count} elements nobody wrote (first at "
                f"index {first}): it was made by empty() and never filled"
            )
    if group.nbytes:
        original = group.array.reshape(-1).view(np.uint8)
        if writable:
            if copy_back:
                original[:] = group.data
        elif not np.array_equal(original, group.data):
            problems.append(f"wrote to read-only (const) {_describe(group)}")
    return problems
