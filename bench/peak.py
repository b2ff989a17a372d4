"""This CPU's peak multiply-add rate on the instructions our expert kernels multiply with.

    python bench/peak.py              # float32 and bf16 GFLOP/s on 1 thread and on --threads (default 2)

The probe (bench/peak.cpp, built like the kernels: kernels.native.build) runs independent chains of one
instruction per thread on registers only: no code on that instruction can go faster. float32: the
fused multiply-add on the widest vectors (16 lanes on AVX-512); bf16: vdpbf16ps where the CPU has
AVX512-BF16, else the float32 FMA (the kernels widen bf16 to float32 there). bench/moe_layer.py
prints it next to each row's target, so a row whose target is above what the instruction can do
shows as such in the same run instead of being argued from a data sheet.
"""

from __future__ import annotations

import argparse
import ctypes
from functools import cache
from pathlib import Path

import torch

from moeray.kernels import native

SOURCE = Path(__file__).with_name("peak.cpp")
ITERATIONS = 4_000_000  # rounds of 24 instructions a thread: ~50 ms at 2 instructions a cycle


@cache
def _probe() -> ctypes._CFuncPtr:
    function = ctypes.CDLL(str(native.build(SOURCE))).moeray_peak_gflops
    function.restype, function.argtypes = ctypes.c_double, [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return function


def peak_gflops(dtype: torch.dtype, threads: int, trials: int = 5) -> tuple[float, str]:
    """(best GFLOP/s of `trials` runs on `threads` threads, the instruction measured) for dtype's multiply-adds."""
    code, instruction = native.DTYPES[dtype], "vdpbf16ps"  # (the kernels' dtype codes, which peak.cpp takes too)
    if dtype == torch.bfloat16 and _probe()(code, 1, 1) < 0:  # no AVX512-BF16 in this build
        code, instruction = 0, "float32 FMA (bf16 widened)"
    elif code == 0:
        instruction = "float32 FMA"
    return max(_probe()(code, ITERATIONS, threads) for _ in range(trials)), instruction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads of the second column (default 2)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    print(f"| dtype | instruction | 1 thread GFLOP/s | {args.threads} threads GFLOP/s |")
    print("| --- | --- | --- | --- |")
    for dtype in native.DTYPES:
        one, instruction = peak_gflops(dtype, 1)
        many, _ = peak_gflops(dtype, args.threads)
        print(f"| {str(dtype).removeprefix('torch.')} | {instruction} | {one:,.0f} | {many:,.0f} |")


if __name__ == "__main__":
    main()
