"""Build a kernels/ source into a shared library that runs on the CPU emulator.

The translation unit is ``cuda_emu.h`` (the CUDA dialect and the fiber scheduler), the kernel
source exactly as the loader gives it (``#line`` directives included, so g++ reports the
original kernels/ file and line), then one generated trampoline per ``extern "C" __global__``
entry point::

    int gbemu_launch_<name>(dims[6], shared_bytes, void** args, seed, char* error, int size)
    const char* gbemu_signature_<name>()   # parameter types as the compiler resolved them

The library is cached on disk under a key covering the source, the emulator headers, the
compiler flags and the compiler's version, so an unchanged kernel is compiled once per machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADERS = ("cuda_emu.h", "cuda_emu_runtime.h", "ptx_twins.h")
# The emulator's versions of CUDA's own headers (cuda_fp16.h, cuda_bf16.h, ...), found by a
# kernel's `#include <...>` as NVRTC finds the toolkit's.
INCLUDE_DIR = HERE / "include"
# -O2 over -O1, measured on kernels/gemm.cu (2 cores): compile 2.65 s vs 2.35 s, the tiled
# 129x129x129 dense_forward 7 ms vs 24 ms (register tiles stay in registers only at -O2).
BASE_FLAGS = (
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-fno-strict-aliasing",  # kernels reinterpret float* as float4* for wide loads
    "-fvisibility=hidden",
    # Big stack frames probe every page, so a fiber stack overflow lands in the guard page
    # instead of silently in the neighbouring fiber's stack.
    "-fstack-clash-protection",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-Wno-unused-function",
    "-Wno-unused-variable",
    "-Wno-class-memaccess",  # memset/memcpy of float4 & co. (alignment-checked, see cuda_emu.h)
)
OPT_FLAGS = ("-O2",)
DEBUG_FLAGS = ("-O0", "-g")

TRAMPOLINE_LABEL = "<emulator trampolines>"

stats = {"compiles": 0, "cache_hits": 0}  # for tests and `gpubackprop info`


class EmuCompileError(RuntimeError):
    """g++ rejected a kernel source; the message carries the compiler's file:line diagnostics."""


class EmuUnsupportedError(EmuCompileError):
    """The source uses a CUDA feature the emulator cannot run faithfully (e.g. inline PTX)."""


@dataclass(frozen=True)
class KernelDecl:
    """A kernel the library exports: ``name`` is how it is looked up (an extern "C" name, or a
    name expression such as ``"gemm<float, 64>"``), ``symbol`` the suffix of its trampolines
    (gbemu_launch_<symbol>, gbemu_signature_<symbol>)."""

    name: str
    param_names: tuple[str, ...]
    symbol: str = ""

    def __post_init__(self) -> None:
        if not self.symbol:
            object.__setattr__(self, "symbol", self.name)


def find_compiler() -> str | None:
    """The C++ compiler: $GPUBACKPROP_EMU_CXX, else $CXX, else g++ on the PATH (None if absent)."""
    for candidate in (os.environ.get("GPUBACKPROP_EMU_CXX"), os.environ.get("CXX"), "g++"):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    return None


@functools.cache
def compiler_identity(cxx: str) -> str:
    """First line of ``cxx --version`` plus the target triple: part of the cache key."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    machine = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, check=True)
    return version.stdout.splitlines()[0].strip() + " " + machine.stdout.strip()


def cache_dir() -> Path:
    """$GPUBACKPROP_CACHE_DIR/emu, else $XDG_CACHE_HOME/gpubackprop/emu, else ~/.cache/..."""
    root = os.environ.get("GPUBACKPROP_CACHE_DIR")
    if root:
        return Path(root) / "emu"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "gpubackprop" / "emu"


def compile_flags() -> tuple[str, ...]:
    """Flags for this process: GPUBACKPROP_EMU_DEBUG=1 builds -O0 -g (for gdb); setting
    GPUBACKPROP_EMU_UCONTEXT=1 forces the portable ucontext fiber switch."""
    flags = list(BASE_FLAGS)
    flags += (
        DEBUG_FLAGS
        if os.environ.get("GPUBACKPROP_EMU_DEBUG") not in (None, "", "0")
        else (OPT_FLAGS)
    )
    if os.environ.get("GPUBACKPROP_EMU_UCONTEXT") not in (None, "", "0"):
        flags.append("-DGBEMU_USE_UCONTEXT")
    return tuple(flags)


def flushes_denormals(options: tuple[str, ...] | list[str]) -> bool:
    """Whether NVRTC options flush float32 subnormals to zero: the last ``-ftz=``/``--ftz=``
    (or ``--use_fast_math``, which implies it) decides; NVRTC's default is false."""
    flush = False
    for option in options:
        name, _, value = str(option).lstrip("-").partition("=")
        if name == "ftz":
            if value not in ("true", "false"):
                raise ValueError(f"option {option!r}: expected -ftz=true or -ftz=false")
            flush = value == "true"
        elif name in ("use_fast_math", "use-fast-math"):
            flush = True
    return flush


def include_flags() -> list[str]:
    """The emulator's headers, and its CUDA headers for a kernel's ``#include <cuda_fp16.h>``."""
    return [f"-I{HERE}", f"-I{INCLUDE_DIR}"]


# ---- reading the source -------------------------------------------------------------------

_TOKEN = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.DOTALL)


def strip_comments(text: str, keep_strings: bool = True) -> str:
    """Blank out comments (and string/char literals unless keep_strings), keeping every
    character's position and every newline, so offsets still map to lines."""

    def blank(match: re.Match[str]) -> str:
        token = match.group(0)
        if token[0] in "\"'" and keep_strings:
            return token
        return re.sub(r"[^\n]", " ", token)

    return _TOKEN.sub(blank, text)


_LINE_DIRECTIVE = re.compile(r'^[ \t]*#[ \t]*line[ \t]+(\d+)(?:[ \t]+"([^"]*)")?', re.MULTILINE)


def origin(text: str, position: int, default_file: str) -> tuple[str, int]:
    """(file, line) of ``position`` in ``text``, honouring ``#line`` directives."""
    file, base_line, base_pos = default_file, 1, 0
    for match in _LINE_DIRECTIVE.finditer(text, 0, position):
        # the directive names the line that follows it
        file = match.group(2) or file
        base_line = int(match.group(1))
        end = text.find("\n", match.end())
        base_pos = len(text) if end < 0 else end + 1
    if position < base_pos:
        return file, base_line
    return file, base_line + text.count("\n", base_pos, position)


_ASM = re.compile(r"\b(?:asm|__asm__|__asm)\b(?:\s+(?:volatile|__volatile__))?\s*\(")
_TEMPLATE = re.compile(r'\s*"((?:\\.|[^"\\\n])*)"')

# The one kernels/ header whose inline PTX the emulator accepts, and the instructions in it:
# each sits in a device function whose emulator body (GPUBACKPROP_EMULATOR) is the twin in
# ptx_twins.h, so g++ never sees the asm.
PTX_TWINS_HEADER = "ptx_twins.cuh"
PTX_TWINS = frozenset(
    {
        "cvt.rn.bf16x2.f32",
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "cp.async.cg.shared.global",
        "cp.async.commit_group",
        "cp.async.wait_group",
    }
)


def ptx_instruction(code: str, position: int) -> str:
    """The first PTX instruction (opcode and modifiers) of the asm template that starts after
    ``position`` in ``code`` (comments blanked, strings kept); "" if there is no string."""
    string = _TEMPLATE.match(code, position)
    if string is None:
        return ""
    words = string.group(1).replace("\\n", " ").replace("\\t", " ").split()
    return words[0].rstrip(";") if words else ""


def check_supported(text: str, label: str) -> None:
    """Refuse what the emulator would run differently from a GPU, naming file and line: inline
    PTX, except the instructions of PTX_TWINS in kernels/ptx_twins.cuh."""
    code = strip_comments(text, keep_strings=True)
    for match in _ASM.finditer(strip_comments(text, keep_strings=False)):
        file, line = origin(text, match.start(), label)
        instruction = ptx_instruction(code, match.end())
        if file == PTX_TWINS_HEADER and instruction in PTX_TWINS:
            continue
        snippet = text[match.start() : text.find("\n", match.start())].strip()
        raise EmuUnsupportedError(
            f"{file}:{line}: inline PTX assembly ({instruction or snippet[:60]!r}) cannot run "
            "on the CPU emulator; give the kernel a plain CUDA C++ path for it (the emulator "
            "defines GPUBACKPROP_EMULATOR), use a device function of kernels/"
            f"{PTX_TWINS_HEADER} (instructions with an emulator twin: "
            f"{', '.join(sorted(PTX_TWINS))}), or test this kernel on a GPU only"
        )


# `extern __shared__ T name[];` -- dynamic shared memory, sized by the launch.  g++ cannot take
# it as written (the emulator's __shared__ is `static`), so it becomes GBEMU_EXTERN_SHARED(T,
# name): a constant pointer to the launch's dynamic shared buffer, whose address never changes
# (cuda_emu_runtime.h), valid at file and at function scope.
_ALIGN_ARGUMENT = r"\(\s*(?:[^()]|\([^()]*\))*\)"  # (16), (sizeof(T))
_EXTERN_SHARED_START = re.compile(r"\b(?:extern\s+__shared__|__shared__\s+extern)\b")
_EXTERN_SHARED = re.compile(
    r"\b(?:extern\s+__shared__|__shared__\s+extern)\s+(?P<type>(?:[^;{}()\[\]]|"
    rf"(?:__align__|alignas)\s*{_ALIGN_ARGUMENT})*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;"
)
_ALIGN = re.compile(rf"(?:__align__|alignas)\s*(?P<argument>{_ALIGN_ARGUMENT})")
DYNAMIC_SHARED_ALIGNMENT = 256  # the dynamic shared buffer's alignment (cuda_emu_runtime.h)


def _in_directive(code: str, position: int) -> bool:
    """Whether ``position`` lies in a preprocessor directive (continuation lines included)."""
    start = code.rfind("\n", 0, position) + 1
    while start > 1 and code[start - 2] == "\\":
        start = code.rfind("\n", 0, start - 1) + 1
    return code[start:position].lstrip().startswith("#")


def rewrite_extern_shared(text: str, label: str) -> str:
    """``text`` with each ``extern __shared__ T name[];`` replaced by GBEMU_EXTERN_SHARED(T,
    name), on the same line (every newline kept, so g++'s lines are the source's)."""
    code = strip_comments(text, keep_strings=False)
    pieces, last = [], 0
    for match in _EXTERN_SHARED.finditer(code):
        declared = match.group("type")
        for align in _ALIGN.finditer(declared):
            argument = align.group("argument")[1:-1].strip()
            alignment = int(argument) if argument.isdigit() else 1  # sizeof(T): at most 256
            if alignment > DYNAMIC_SHARED_ALIGNMENT or alignment & (alignment - 1):
                file, line = origin(text, match.start(), label)
                raise EmuUnsupportedError(
                    f"{file}:{line}: extern __shared__ {match.group('name')}[] asks for "
                    f"{alignment}-byte alignment; the emulator's dynamic shared memory is "
                    f"{DYNAMIC_SHARED_ALIGNMENT}-byte aligned (a power of two up to that is "
                    "accepted)"
                )
        element = " ".join(_ALIGN.sub(" ", declared).split())
        newlines = text.count("\n", match.start(), match.end())
        pieces += [
            text[last : match.start()],
            f"GBEMU_EXTERN_SHARED({element}, {match.group('name')});" + "\n" * newlines,
        ]
        last = match.end()
    rewritten = "".join(pieces) + text[last:] if pieces else text
    code = strip_comments(rewritten, keep_strings=False)
    for left in _EXTERN_SHARED_START.finditer(code):
        if _in_directive(code, left.start()):
            continue  # a macro body (kernels/common.cuh's GB_DYNAMIC_SHARED for NVRTC)
        file, line = origin(rewritten, left.start(), label)
        raise EmuUnsupportedError(
            f"{file}:{line}: the emulator reads dynamic shared memory declared as `extern "
            "__shared__ T name[];` (an array of unknown size, optionally __align__(n)); this "
            "declaration is not of that form"
        )
    return rewritten


# `__shared__ T name[...];` at function scope: g++ drops the section attribute (cuda_emu.h) of a
# template's static locals, so each such declaration is followed by GBEMU_FILL_SHARED(name),
# which fills the variable with the shared-memory pattern once per block (cuda_emu_runtime.h:
# fill_static_shared).  Declarations at file or namespace scope stay in the section.
_STATIC_SHARED = re.compile(r"\b__shared__\b(?P<declaration>[^;{}]*);")
_SCOPE_OPENER = re.compile(r"\b(?:namespace|struct|class|union|enum)\b[^;{}()]*$")
_DECLARATOR_NAME = re.compile(r"(?P<name>[A-Za-z_]\w*)\s*(?:\[[^\[\]]*\]\s*)*$")


def _top_level_parts(text: str) -> list[str]:
    """``text`` split at the commas outside (), [], <> and {}."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([<{":
            depth += 1
        elif char in ")]>}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _in_function(code: str, position: int) -> bool:
    """Whether ``position`` lies inside a function body: the innermost unclosed '{' before it
    is not a namespace's, struct's or class's."""
    depth = 0
    for i in range(position - 1, -1, -1):
        char = code[i]
        if char == "}":
            depth += 1
        elif char == "{":
            if depth == 0:
                return not _SCOPE_OPENER.search(code[max(0, i - 200) : i])
            depth -= 1
    return False


def mark_static_shared(text: str) -> str:
    """``text`` with GBEMU_FILL_SHARED(name); after each function-scope static ``__shared__``
    declaration (each declarator of it), on the same line, so that g++'s lines stay the
    source's."""
    code = strip_comments(text, keep_strings=False)
    pieces, last = [], 0
    for match in _STATIC_SHARED.finditer(code):
        if _in_directive(code, match.start()) or not _in_function(code, match.start()):
            continue
        declaration = _ALIGN.sub(" ", match.group("declaration"))
        names = []
        for part in _top_level_parts(declaration):
            found = _DECLARATOR_NAME.search(part.strip())
            if found:
                names.append(found.group("name"))
        if not names:
            continue
        fills = "".join(f" GBEMU_FILL_SHARED({name});" for name in names)
        pieces += [text[last : match.end()], fills]
        last = match.end()
    return "".join(pieces) + text[last:] if pieces else text


_KERNEL = re.compile(
    r'extern\s+"C"\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?__global__\s+'
    r"(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?"
    r"([A-Za-z_]\w*)\s*\(([^)]*)\)"
)


def parse_kernels(text: str) -> list[KernelDecl]:
    """Every ``extern "C" __global__ void name(params)`` with its parameter names (the types
    come from the compiler, see gbemu::signature)."""
    code = strip_comments(text)
    kernels = []
    for match in _KERNEL.finditer(code):
        params = [p.strip() for p in match.group(2).split(",") if p.strip()]
        if params == ["void"]:
            params = []
        names = []
        for index, param in enumerate(params):
            words = re.findall(r"[A-Za-z_]\w*", param)
            names.append(words[-1] if words else f"arg{index}")
        kernels.append(KernelDecl(match.group(1), tuple(names)))
    return kernels


# Any __global__ function, templated or in a namespace: the parameter names of the kernels a
# name expression instantiates.
_ANY_KERNEL = re.compile(
    r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+"
    r"(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(([^)]*)\)"
)
_NAME_EXPRESSION = re.compile(r"[A-Za-z_:][\w:<>, *&+\-().]*")


def name_expression_kernels(text: str, expressions: tuple[str, ...]) -> list[KernelDecl]:
    """A KernelDecl per name expression (``"kern<float, 64>"``, ``"ns::kern"``), as CuPy's
    RawModule(name_expressions=...) takes them: its trampolines instantiate the template."""
    params: dict[str, tuple[str, ...]] = {}
    for match in _ANY_KERNEL.finditer(strip_comments(text)):
        names = [p.strip() for p in match.group(2).split(",") if p.strip() and p.strip() != "void"]
        params.setdefault(
            match.group(1),
            tuple((re.findall(r"[A-Za-z_]\w*", p) or [f"arg{i}"])[-1] for i, p in enumerate(names)),
        )
    kernels = []
    for expression in expressions:
        if not isinstance(expression, str) or not _NAME_EXPRESSION.fullmatch(expression.strip()):
            raise ValueError(
                f"name_expressions entry {expression!r} is not a kernel name expression; "
                "expected a C++ name with template arguments, such as 'kern<float, 64>'"
            )
        base = expression.split("<", 1)[0].split("::")[-1].strip()
        symbol = "expr_" + hashlib.sha256(expression.encode()).hexdigest()[:16]
        kernels.append(KernelDecl(expression, params.get(base, ()), symbol))
    return kernels


_SOURCE_STARTS = "gbemu_kernel_source_starts_here"


def directives_applied(cxx: str, flags: tuple[str, ...], text: str, label: str) -> str:
    """``text`` with its preprocessor conditionals decided as the emulator's build decides
    them (cuda_emu.h's macros, such as __CUDA_ARCH__, included), macros left unexpanded: the
    kernels a source defines under #if (gemm.cu's GEMM_TILED, say) are then found exactly
    when the compiler sees them, as NVRTC does on a GPU."""
    language = [f for f in flags if f.startswith(("-std", "-D", "-U"))]
    source = f'#include "cuda_emu.h"\n{_SOURCE_STARTS}\n{text}'
    command = [cxx, *language, *include_flags(), "-E", "-fdirectives-only", "-x", "c++", "-"]
    result = subprocess.run(command, input=source, capture_output=True, text=True)
    if result.returncode != 0:
        raise EmuCompileError(_compile_message(label, result.stderr, command))
    return result.stdout[result.stdout.rfind(_SOURCE_STARTS) + len(_SOURCE_STARTS) :]


# Exported once per library: launch.py sets the flush-to-zero mode of the next launch with it.
_CONFIGURE = (
    'extern "C" __attribute__((visibility("default"))) void '
    "gbemu_set_flush_denormals(int on) { gbemu::g.flush_denormals = on; }"
)


def translation_unit(text: str, label: str, kernels: list[KernelDecl]) -> str:
    parts = ['#include "cuda_emu.h"', f'#line 1 "{label}"', text]
    parts += [f'#line 1 "{TRAMPOLINE_LABEL}"', _CONFIGURE]
    for kernel in kernels:
        name, symbol = kernel.name, kernel.symbol
        where = TRAMPOLINE_LABEL if name == symbol else f"<name expression {name}>"
        parts.append(f'#line 1 "{where}"')
        parts.append(
            f'extern "C" __attribute__((visibility("default"))) int gbemu_launch_{symbol}('
            "const long long* dims, long long shared_bytes, void** args, "
            "unsigned long long seed, char* error, int error_size) {\n"
            f"    return gbemu::launch(&{name}, dims, shared_bytes, args, seed, error, "
            "error_size);\n}\n"
            f'extern "C" __attribute__((visibility("default"))) const char* '
            f"gbemu_signature_{symbol}() {{ return gbemu::signature(&{name}); }}"
        )
    return "\n".join(parts) + "\n"


# ---- building -------------------------------------------------------------------------------


@functools.cache
def _header_text() -> str:
    """Every emulator header, in a fixed order: part of the cache key."""
    paths = [HERE / name for name in HEADERS] + sorted(INCLUDE_DIR.rglob("*.h"))
    return "".join(f"{path.relative_to(HERE)}\0{path.read_text()}" for path in paths)


def build(
    text: str,
    label: str,
    name_expressions: tuple[str, ...] = (),
    extra_flags: tuple[str, ...] = (),
) -> tuple[Path, list[KernelDecl]]:
    """Compile ``text`` (a kernels/ source after loading) into a cached shared library.

    ``label`` names the source in messages.  Returns the library path and its kernels: every
    ``extern "C"`` kernel, and one per name expression (a template instantiated, as CuPy's
    ``RawModule(name_expressions=...)`` does).  ``extra_flags``: g++ options (-D, -U, -std)
    translated from a RawModule's NVRTC options.
    Raises EmuUnsupportedError for inline PTX and EmuCompileError with g++'s diagnostics.

    The cache entry for a key is ``<key>.so`` with ``<key>.json`` beside it (the library's size
    and SHA-256, and its kernels).  Several processes may build one key at once: each compiles
    in a private folder and publishes by atomic rename, the record before the library, so a
    reader never sees a half-written file; an entry that does not match its record (a truncated
    or empty library, a killed copy) is rebuilt instead of loaded.
    """
    check_supported(text, label)
    name_expressions = tuple(name_expressions)
    text = mark_static_shared(rewrite_extern_shared(text, label))
    cxx = find_compiler()
    if cxx is None:
        raise EmuCompileError(
            "no C++ compiler found (set CXX or GPUBACKPROP_EMU_CXX, or install g++)"
        )
    flags = compile_flags() + tuple(extra_flags)  # -D/-U/-std from a RawModule's options
    digest = hashlib.sha256()
    expressions = "\n".join(name_expressions)
    for part in (text, label, expressions, _header_text(), " ".join(flags), compiler_identity(cxx)):
        digest.update(part.encode())
        digest.update(b"\0")
    key = digest.hexdigest()[:32]
    directory = cache_dir()
    library, record = directory / f"{key}.so", directory / f"{key}.json"
    kernels = _verified_entry(library, record)
    if kernels is not None:
        stats["cache_hits"] += 1
        return library, kernels
    decided = directives_applied(cxx, flags, text, label)
    kernels = parse_kernels(decided) + name_expression_kernels(decided, name_expressions)
    unit = translation_unit(text, label, kernels)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(directory)
    with tempfile.TemporaryDirectory(prefix=f"{BUILD_PREFIX}{key}-", dir=directory) as private:
        source, output = Path(private) / f"{key}.cpp", Path(private) / f"{key}.so"
        source.write_text(unit)
        # The private folder's name must not reach the library (it would differ per process).
        command = [
            cxx,
            *flags,
            f"-frandom-seed={key}",
            *include_flags(),
            source.name,
            "-o",
            output.name,
        ]
        result = subprocess.run(command, capture_output=True, text=True, cwd=private)
        stats["compiles"] += 1
        if result.returncode != 0:
            raise EmuCompileError(_compile_message(label, result.stderr, command))
        data = output.read_bytes()
        entry = {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "label": label,
            "kernels": [[k.name, list(k.param_names), k.symbol] for k in kernels],
        }
        written = Path(private) / "record.json"
        written.write_text(json.dumps(entry))
        # Each rename is atomic; the source is kept for reading (the library's #line targets).
        os.replace(source, directory / f"{key}.cpp")
        os.replace(written, record)
        os.replace(output, library)
    return library, kernels


BUILD_PREFIX = ".build-"
STALE_BUILD_SECONDS = 3600.0  # a build folder older than this belongs to a killed process


def _verified_entry(library: Path, record: Path) -> list[KernelDecl] | None:
    """The kernels of a cache entry whose library matches its record (size, then SHA-256);
    None if there is no entry or it is damaged (then it is rebuilt, with a warning)."""
    if not library.exists():
        return None
    problem = ""
    try:
        entry = json.loads(record.read_text())
        size = library.stat().st_size
        if size != entry["size"]:
            problem = f"{size} bytes instead of {entry['size']}"
        elif hashlib.sha256(library.read_bytes()).hexdigest() != entry["sha256"]:
            problem = "its checksum does not match the one recorded after the build"
        else:
            return [
                KernelDecl(name, tuple(params), symbol) for name, params, symbol in entry["kernels"]
            ]
    except FileNotFoundError:
        problem = f"its record {record.name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"its record {record.name} is unreadable ({type(error).__name__}: {error})"
    warnings.warn(
        f"the emulator's cached library {library} is damaged ({problem}); rebuilding it",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _remove_stale_builds(directory: Path) -> None:
    """Private build folders left by killed processes (a live build is younger)."""
    now = time.time()
    for folder in directory.glob(f"{BUILD_PREFIX}*"):
        try:
            if now - folder.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _compile_message(label: str, log: str, command: list[str]) -> str:
    lines = log.splitlines()
    errors = [line for line in lines if ": error:" in line or ": fatal error:" in line]
    first = errors[0] if errors else (lines[0] if lines else "(no output)")
    shown = "\n".join(lines[:80]) + ("\n..." if len(lines) > 80 else "")
    return (
        f"the emulator could not compile {label}: {first}\n"
        f"--- compiler log ({len(errors)} error(s)) ---\n{shown}\n"
        f"--- command: {' '.join(command)}"
    )
