"""The GEMM kernels' configuration: versions, tile sizes per scalar type, and the launch each
output shape gets.

gemm.cu holds three versions of each GEMM (dense_forward, dense_backward_weight,
dense_backward_data): "tiled" (the library's), "warptiled" (the warp-tiled alternative, to
become the default once a GPU measurement says it is faster) and "naive" (one thread per output
element, kept to validate both).  Their tuning values are gemm.cu's #defines; the tables below
give them per scalar type (gemm.cu's defaults are the float entries) and ``check_gemm_tiles``
restates gemm.cu's static_asserts so a bad table fails when the backend is built, not when NVRTC
compiles.  bench/gemm_sweep.py times alternatives on a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "GEMM_TILES",
    "GEMM_TILES_WARPTILED",
    "GEMM_VERSIONS",
    "GemmConfig",
    "GemmLaunch",
    "check_gemm_tiles",
]

GEMM_VERSIONS = ("tiled", "warptiled", "naive")

# tiled: GEMM_THREADS = (TILE_M/MICRO_M)·(TILE_N/MICRO_N).
GEMM_TILES = {
    "float": {"TILE_M": 128, "TILE_N": 128, "TILE_K": 8, "MICRO_M": 8, "MICRO_N": 8},
    "double": {"TILE_M": 128, "TILE_N": 128, "TILE_K": 8, "MICRO_M": 8, "MICRO_N": 8},
}
# warptiled: WT_THREADS = 32·(WT_BM/WT_WM)·(WT_BN/WT_WN); each thread holds
# (WT_WM·WT_WN/32) accumulators, so double gets a half-size block tile to stay within 255
# registers, and WT_BK = 8 to stay within 48 KiB of static shared memory.
GEMM_TILES_WARPTILED = {
    "float": {
        "WT_BM": 128,
        "WT_BN": 128,
        "WT_BK": 16,
        "WT_WM": 64,
        "WT_WN": 64,
        "WT_WNITER": 4,
        "WT_TM": 8,
        "WT_TN": 4,
    },
    "double": {
        "WT_BM": 128,
        "WT_BN": 64,
        "WT_BK": 8,
        "WT_WM": 64,
        "WT_WN": 32,
        "WT_WNITER": 2,
        "WT_TM": 4,
        "WT_TN": 4,
    },
}
_VERSION_TILES = {"tiled": GEMM_TILES, "warptiled": GEMM_TILES_WARPTILED, "naive": GEMM_TILES}
NAIVE_BLOCK = 16  # the naive kernels' block is NAIVE_BLOCK × NAIVE_BLOCK threads


class GemmLaunch(NamedTuple):
    """One GEMM launch: the entry point of gemm.cu, its grid and block, and whether it takes
    the two 16-byte-load flags after its other arguments (the tiled versions do)."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    takes_vector_flags: bool


class GemmConfig:
    """A GEMM version and its tiles per scalar type ("float", "double").

    ``tiles`` overrides entries of the version's defaults, e.g.
    ``{"float": {"TILE_K": 16}}``; every resulting table is checked (check_gemm_tiles)."""

    def __init__(self, version: str = "tiled", tiles: dict | None = None) -> None:
        if version not in GEMM_VERSIONS:
            raise ValueError(f"gemm_version={version!r}; expected one of {GEMM_VERSIONS}")
        self.version = version
        defaults = _VERSION_TILES[version]
        self.tiles = {
            kind: dict(defaults[kind], **(tiles or {}).get(kind, {})) for kind in defaults
        }
        for kind, table in self.tiles.items():
            check_gemm_tiles(kind, table)
        self._blocks = {kind: _gemm_block(table) for kind, table in self.tiles.items()}

    def defines(self, kind: str) -> dict[str, int]:
        """gemm.cu's #defines for scalar type ``kind``: it holds every version, and only the
        one this config launches is compiled (GEMM_TILED / GEMM_WARPTILED / GEMM_NAIVE), with
        the tuning values of both tiled versions for this type (the file's defaults are
        float's)."""
        only = {f"GEMM_{v.upper()}": int(v == self.version) for v in GEMM_VERSIONS}
        return {**GEMM_TILES[kind], **GEMM_TILES_WARPTILED[kind], **self.tiles[kind], **only}

    def launch(self, kernel: str, kind: str, rows: int, cols: int) -> GemmLaunch:
        """The launch of gemm.cu's ``kernel`` over a (rows, cols) output of type ``kind``:
        ``kernel`` (tiled), ``<kernel>_warptiled`` or ``<kernel>_naive``."""
        if self.version == "naive":
            grid = (_ceil_div(cols, NAIVE_BLOCK), _ceil_div(rows, NAIVE_BLOCK), 1)
            return GemmLaunch(f"{kernel}_naive", grid, (NAIVE_BLOCK, NAIVE_BLOCK, 1), False)
        block_rows, block_cols, threads = self._blocks[kind]
        grid = (_ceil_div(rows, block_rows), _ceil_div(cols, block_cols), 1)
        name = kernel if self.version == "tiled" else f"{kernel}_{self.version}"
        return GemmLaunch(name, grid, (threads, 1, 1), True)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_gemm_tiles(kind: str, tiles: dict[str, int]) -> None:
    """The constraints gemm.cu's static_asserts and the launch impose, checked up front."""
    if "WT_BM" in tiles:
        _check_warptiled_tiles(kind, tiles)
        return
    t = tiles
    problems = []
    if t["TILE_K"] % 4 or t["MICRO_M"] % 4 or t["MICRO_N"] % 4:
        problems.append("TILE_K, MICRO_M and MICRO_N must be multiples of 4")
    if t["TILE_M"] % t["MICRO_M"] or t["TILE_N"] % t["MICRO_N"]:
        problems.append("MICRO_M must divide TILE_M and MICRO_N must divide TILE_N")
    elif not 32 <= _gemm_threads(t) <= 1024:
        problems.append(f"{_gemm_threads(t)} threads per block; expected 32 to 1024")
    problems += _shared_memory_problem(kind, t["TILE_K"], t["TILE_M"], t["TILE_N"])
    if problems:
        raise ValueError(f"gemm_tiles[{kind!r}]={tiles} is not accepted: " + "; ".join(problems))


def _check_warptiled_tiles(kind: str, tiles: dict[str, int]) -> None:
    """The warp-tiled version's constraints (gemm.cu's WT_ static_asserts and the launch)."""
    t = tiles
    problems = []
    if t["WT_BK"] % 4 or t["WT_TM"] % 4 or t["WT_TN"] % 4:
        problems.append("WT_BK, WT_TM and WT_TN must be multiples of 4")
    if t["WT_BM"] % t["WT_WM"] or t["WT_BN"] % t["WT_WN"]:
        problems.append("WT_WM must divide WT_BM and WT_WN must divide WT_BN")
    elif not _gemm_block(t)[2] <= 1024:
        problems.append(f"{_gemm_block(t)[2]} threads per block; expected at most 1024")
    per_warp_row = 32 * t["WT_TM"] * t["WT_TN"] * t["WT_WNITER"]
    if (t["WT_WM"] * t["WT_WN"]) % per_warp_row:
        problems.append(
            f"WT_WM·WT_WN={t['WT_WM'] * t['WT_WN']} must be a multiple of "
            f"32·WT_TM·WT_TN·WT_WNITER={per_warp_row}"
        )
    else:
        wmiter = t["WT_WM"] * t["WT_WN"] // per_warp_row
        if t["WT_WM"] % wmiter or t["WT_WN"] % t["WT_WNITER"]:
            problems.append(f"WT_WMITER={wmiter} and WT_WNITER must divide WT_WM and WT_WN")
        else:
            # Then the sub-tile holds exactly 32 thread tiles (one per lane) when they fit.
            sub_m, sub_n = t["WT_WM"] // wmiter, t["WT_WN"] // t["WT_WNITER"]
            if sub_m % t["WT_TM"] or sub_n % t["WT_TN"]:
                problems.append(
                    f"WT_TM and WT_TN must divide the warp sub-tile {sub_m}x{sub_n} "
                    f"(WT_WMITER={wmiter})"
                )
    problems += _shared_memory_problem(kind, t["WT_BK"], t["WT_BM"], t["WT_BN"])
    if problems:
        raise ValueError(f"gemm_tiles[{kind!r}]={tiles} is not accepted: " + "; ".join(problems))


def _shared_memory_problem(kind: str, depth: int, block_rows: int, block_cols: int) -> list[str]:
    """Both versions stage two depth × (rows + 4 padding) slices per operand (gemm.cu's
    gemm_smem_stride); static shared memory is limited to 48 KiB."""
    itemsize = 4 if kind == "float" else 8
    shared = 2 * depth * (block_rows + block_cols + 8) * itemsize
    return [f"{shared} bytes of static shared memory; at most 49152"] if shared > 48 * 1024 else []


def _gemm_threads(tiles: dict[str, int]) -> int:
    return (tiles["TILE_M"] // tiles["MICRO_M"]) * (tiles["TILE_N"] // tiles["MICRO_N"])


def _gemm_block(tiles: dict[str, int]) -> tuple[int, int, int]:
    """(output rows, output columns, threads) of one block of either tiled version."""
    if "WT_BM" in tiles:
        warps = (tiles["WT_BM"] // tiles["WT_WM"]) * (tiles["WT_BN"] // tiles["WT_WN"])
        return tiles["WT_BM"], tiles["WT_BN"], 32 * warps
    return tiles["TILE_M"], tiles["TILE_N"], _gemm_threads(tiles)
