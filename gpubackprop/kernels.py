"""Find, load and compile the CUDA sources in kernels/.

A source is read with its quoted ``#include "x.cuh"`` headers inlined (each header once), with
``#line`` directives so that compiler messages point at the original file and line, and with the
caller's ``#define``s prepended.  The SHA-256 of that text is the compile cache key, so editing a
header invalidates every source that includes it.

``nvrtc_compile`` calls NVRTC directly (through CuPy's thin binding): it needs no GPU, which is
how the test suite compiles every kernel for every architecture on a CPU-only machine.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dtypes import C_TYPES, check_dtype

__all__ = [
    "CUPY_ADDED_OPTIONS",
    "NVRTC_OPTIONS",
    "KernelCompileError",
    "KernelSource",
    "compiled_keys",
    "elementwise_as_kernel_source",
    "elementwise_label",
    "elementwise_preamble",
    "entry_points",
    "format_compile_error",
    "kernel_dir",
    "kernel_files",
    "kernel_inventory",
    "load_source",
    "nvrtc_compile",
    "ptxas_report",
    "real_type",
]

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"\s*$')
_SYSTEM_INCLUDE = re.compile(r"^\s*#\s*include\s*<([^>]+)>")
_ENTRY_POINT = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?'
    r"(\w+)\s*\("
)
_LOG_LOCATION = re.compile(r"^(?P<file>[^\s()]+)\((?P<line>\d+)\): (?P<kind>error|warning)")
_DEFINE_NAME = re.compile(r"^[A-Za-z_]\w*$")

# The options every kernel is compiled with, here and by CuPy (RawModule and ElementwiseKernel);
# CuPy adds -arch and its include paths.  Stated explicitly because CuPy's default standard has
# changed between releases (C++11, 14, 17) and a test compile must match a device compile.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)
# CuPy adds these itself to every compile (cupy/cuda/compiler.py; passing them again is an
# error).  nvrtc_compile adds them so that a CPU compile, and its ptxas report, is the GPU's:
# -ftz=true flushes float32 denormals to zero on the device.
CUPY_ADDED_OPTIONS: tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")

# Source keys compiled in this process (by nvrtc_compile or a seam), for `gpubackprop info`.
_compiled: dict[str, str] = {}


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message names the file, its kernels, shows the
    compiler log and the offending source lines with their numbers."""

    def __init__(self, message: str, file: str = "", log: str = "") -> None:
        super().__init__(message)
        self.file = file
        self.log = log


@dataclass(frozen=True)
class KernelSource:
    """A kernels/ source ready to compile: ``text`` (defines + inlined headers), ``key``
    (SHA-256 of text), ``file`` (the name under kernels/)."""

    file: str
    text: str
    key: str
    defines: tuple[tuple[str, str], ...] = ()

    @property
    def kernels(self) -> list[str]:
        return entry_points(self.text)


def kernel_dir() -> Path:
    """kernels/ inside the installed package (gpubackprop/_kernels) or in the source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_kernels", package.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no CUDA kernel directory: looked for {package / '_kernels'} (installed package) and "
        f"{package.parent / 'kernels'} (source checkout); reinstall gpubackprop"
    )


def kernel_files() -> list[str]:
    """Names of the compilable sources (*.cu) in kernel_dir(), sorted."""
    return sorted(p.name for p in kernel_dir().glob("*.cu"))


def real_type(dtype: Any) -> str:
    """The C type for a float dtype: "float" or "double" (dtypes.C_TYPES)."""
    kind = check_dtype(dtype)
    return C_TYPES[kind.name]


def _inline(name: str, directory: Path, seen: set[str], parent: str | None, line: int) -> str:
    path = directory / name
    if not path.is_file():
        where = f'{parent}:{line} includes "{name}"' if parent else f"kernel source {name!r}"
        raise FileNotFoundError(f"{where}, which does not exist in {directory}")
    seen.add(name)
    out = [f'#line 1 "{name}"']
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        system = _SYSTEM_INCLUDE.match(text)
        if system:
            raise ValueError(
                f"{name}:{number} includes <{system.group(1)}>: NVRTC has no system headers; "
                "use built-ins or a header from kernels/"
            )
        include = _INCLUDE.match(text)
        if include:
            header = include.group(1)
            if header not in seen:
                out.append(_inline(header, directory, seen, name, number))
            out.append(f'#line {number + 1} "{name}"')
            continue
        out.append(text)
    return "\n".join(out)


def load_source(file: str, defines: dict[str, str] | None = None) -> KernelSource:
    """Read kernels/<file>, inline its quoted includes (once each), prepend ``#define k v``."""
    defines = dict(defines or {})
    for key in defines:
        if not _DEFINE_NAME.match(key):
            raise ValueError(f"define name {key!r} is not a C identifier")
    header = "".join(f"#define {k} {defines[k]}\n" for k in sorted(defines))
    text = header + _inline(file, kernel_dir(), set(), None, 0) + "\n"
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return KernelSource(file, text, key, tuple(sorted(defines.items())))


def entry_points(text: str) -> list[str]:
    """Names of the ``extern "C" __global__`` functions in a source text."""
    return _ENTRY_POINT.findall(text)


def format_compile_error(
    file: str, text: str, log: str, context: int = 2, label: str | None = None
) -> str:
    """A readable compile error: what was compiled (``label``, default kernels/<file>), its
    kernels, the log, and each error's source lines."""
    kernels = ", ".join(entry_points(text)) or "(no entry points found)"
    what = label or f"kernels/{file}"
    parts = [f"CUDA compile of {what} failed (kernels: {kernels})", "", log.strip()]
    shown: set[tuple[str, int]] = set()
    for raw in log.splitlines():
        match = _LOG_LOCATION.match(raw.strip())
        if not match or match.group("kind") != "error":
            continue
        where, number = match.group("file"), int(match.group("line"))
        if (where, number) in shown:
            continue
        shown.add((where, number))
        lines = _source_lines(where, text)
        if not lines:
            continue
        low, high = max(1, number - context), min(len(lines), number + context)
        parts.append(f"\n{where}, line {number}:")
        for i in range(low, high + 1):
            marker = ">" if i == number else " "
            parts.append(f"{marker}{i:5d} | {lines[i - 1]}")
    return "\n".join(parts)


def _source_lines(where: str, text: str) -> list[str]:
    """Lines of the file the log names: a kernels/ file (named by #line), else the text after
    ``#line 1 "<where>"`` (generated code, e.g. an ElementwiseKernel), else the whole text."""
    try:
        path = kernel_dir() / Path(where).name
        if path.is_file():
            return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        pass
    lines = text.splitlines()
    marker = f'#line 1 "{where}"'
    if marker in lines:
        return lines[lines.index(marker) + 1 :]
    return lines


def nvrtc_compile(
    source: KernelSource | str,
    arch: str = "sm_90",
    extra_options: tuple[str, ...] | list[str] = (),
    *,
    verbose: bool = False,
) -> tuple[bytes, str]:
    """Compile with NVRTC (no GPU needed) and the options CuPy would use; return (cubin, log).

    ``verbose`` adds ``--ptxas-options=-v`` (registers, stack and spills per kernel in the log).
    Raises KernelCompileError naming the file and its kernels with the log and source lines."""
    from cupy_backends.cuda.libs import nvrtc

    if isinstance(source, str):
        source = KernelSource("<string>.cu", source, hashlib.sha256(source.encode()).hexdigest())
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch={arch!r} is not accepted; expected 'sm_XX' such as 'sm_90'")
    options = [*NVRTC_OPTIONS, *CUPY_ADDED_OPTIONS, f"-arch={arch}", *extra_options]
    if verbose:
        options.append("--ptxas-options=-v")
    program = nvrtc.createProgram(source.text, source.file, [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            log = nvrtc.getProgramLog(program)
            message = format_compile_error(source.file, source.text, log or str(error))
            raise KernelCompileError(message, source.file, log) from None
        log = nvrtc.getProgramLog(program)
        cubin = nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    _compiled[source.key] = source.file
    return cubin, log


_PTXAS_FUNCTION = re.compile(r"Function properties for (\w+)")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_report(log: str) -> dict[str, dict[str, int]]:
    """{kernel: {registers, spill_stores, spill_loads, stack}} from a ``ptxas -v`` log."""
    report: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = _PTXAS_ENTRY.search(line) or _PTXAS_FUNCTION.search(line)
        if entry:
            current = entry.group(1)
            report.setdefault(
                current, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0}
            )
            continue
        if current is None:
            continue
        frame = _PTXAS_FRAME.search(line)
        if frame:
            report[current]["stack"] = int(frame.group(1))
            report[current]["spill_stores"] = int(frame.group(2))
            report[current]["spill_loads"] = int(frame.group(3))
        regs = _PTXAS_REGS.search(line)
        if regs:
            report[current]["registers"] = int(regs.group(1))
    return report


def compiled_keys() -> dict[str, str]:
    """{source key: file} of every source compiled in this process."""
    return dict(_compiled)


def note_compiled(source: KernelSource) -> None:
    """Record a compile done elsewhere (a device seam) for kernel_inventory()."""
    _compiled[source.key] = source.file


def kernel_inventory() -> dict[str, Any]:
    """For `gpubackprop info`: the kernel directory, each source's entry points and how many
    variants of it were compiled in this process, and CuPy's on-disk kernel cache."""
    import os

    directory = kernel_dir()
    compiled_files = list(_compiled.values())
    files = {}
    for name in kernel_files():
        text = (directory / name).read_text(encoding="utf-8")
        files[name] = {
            "kernels": entry_points(text),
            "compiled_variants": compiled_files.count(name),
        }
    cache_dir = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))
    cached = sum(1 for _ in cache_dir.glob("*")) if cache_dir.is_dir() else 0
    return {
        "directory": str(directory),
        "files": files,
        "cupy_cache": {"directory": str(cache_dir), "entries": cached},
    }


# -- elementwise kernels ------------------------------------------------------------------------

_SCALAR_TYPES = {
    "float32": "float",
    "float64": "double",
    "int32": "int",
    "int64": "long long",
    "float": "float",
    "double": "double",
    "int": "int",
}


def elementwise_preamble(spec: Any, dtype: Any) -> str:
    """``#define REAL_T <float|double>`` then spec.preamble_files inlined: the preamble the
    seams give an elementwise kernel so that real_t equals the kernel's T."""
    parts = [f"#define REAL_T {real_type(dtype)}"]
    seen: set[str] = set()
    for name in spec.preamble_files:
        if name not in seen:
            parts.append(_inline(name, kernel_dir(), seen, None, 0))
    # What follows is generated code (CuPy's kernel, or the emulator's wrapper): a compile
    # error in the operation is then reported against it, not against the last header.
    parts.append(f'#line 1 "{elementwise_label(spec)}"')
    return "\n".join(parts) + "\n"


def elementwise_label(spec: Any) -> str:
    """How compile errors name the generated code of an ElementwiseSpec."""
    return f"{spec.name}.elementwise"


def _parse_params(params: str, where: str) -> list[tuple[str, str]]:
    out = []
    for item in params.split(","):
        words = item.split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"{where}: parameter {item.strip()!r} is not 'TYPE name'")
        out.append((words[0], words[1]))
    return out


def elementwise_as_kernel_source(spec: Any, dtype: Any, preamble: str | None = None) -> str:
    """An ``extern "C" __global__`` kernel equivalent to the CuPy ElementwiseKernel ``spec``
    (with ``preamble`` as given, default ``elementwise_preamble(spec, dtype)``).

    Signature: every array parameter (type T) becomes a pointer (const for inputs), every scalar
    keeps its C type, then ``long long n``.  The kernel loops i over [0, n) grid-stride; inside,
    each array parameter is a reference to its element i (so outputs can be read and written),
    exactly the names the body uses.  Launch it with any 1-D grid, e.g. (⌈n/256⌉, 256)."""
    ctype = real_type(dtype)
    inputs = _parse_params(spec.in_params, f"{spec.name}.in_params")
    outputs = _parse_params(spec.out_params, f"{spec.name}.out_params")
    signature, bindings = [], []
    for kind, params in (("in", inputs), ("out", outputs)):
        for type_name, name in params:
            if type_name == "T":
                const = "const " if kind == "in" else ""
                signature.append(f"{const}{ctype}* __restrict__ {name}_array")
                bindings.append(f"        {const}{ctype}& {name} = {name}_array[i];")
            elif type_name in _SCALAR_TYPES:
                if kind == "out":
                    raise ValueError(f"{spec.name}: output {name!r} must be an array (type T)")
                signature.append(f"{_SCALAR_TYPES[type_name]} {name}")
            else:
                raise ValueError(f"{spec.name}: parameter type {type_name!r} is not supported")
    signature.append("long long n")
    return (
        (elementwise_preamble(spec, dtype) if preamble is None else preamble)
        + f"typedef {ctype} T;\n"
        + f'extern "C" __global__ void {spec.name}({", ".join(signature)}) {{\n'
        + "    const long long stride = (long long)gridDim.x * blockDim.x;\n"
        + "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;"
        + " i += stride) {\n"
        + "\n".join(bindings)
        + "\n"
        + f"        {spec.operation}\n"
        + "    }\n}\n"
    )
