"""Batch-norm kernel benchmark: native torch, bnlib (eager and compiled), autograd from ops, NumPy.

Run with ``make bench`` (or ``python benchmarks/bench_batchnorm.py --help``). Prints, per mode and
shape, the median time of each implementation, its ratio to torch's native kernel measured in the
same run, its time in units of a copy of the input, and what it keeps for backward; then the
roofline (each kernel's time over its least traffic at the STREAM-like rates of the same read/write mix), the one-time
compile cost, the speed-up of folding BN into the convolution before it, and which targets hold.
Timings depend on the machine and its load: read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bnlib.bench import roofline, timing
from bnlib.norm import compiled
from bnlib.present.report import Table

# training forward+backward at the conv shapes: what must hold (impl, bound on its ratio to native)
TARGETS = {
    "bnlib": 1.6,  # eager bnlib.norm.functional within 1.6x of native
    "compiled": 1.0,  # compiled at or below native
    "numpy": 3.0,  # NumPy reference within 3x of native
}
FROM_OPS_OVER_BNLIB = 2.0  # bnlib at least 2x faster than autograd from ops


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, s)) + ")"


def table(results: list[timing.Result], mode: str) -> Table:
    rows = []
    for r in results:
        if r.mode != mode:
            continue
        saved = "" if r.saved is None else f"{r.saved[0]:.2f} / {r.saved[1]:.2f}"
        ms, copies = f"{r.median_s * 1e3:.2f}", f"{r.copy_ratio:.1f}"
        rows.append([_shape(r.shape), r.impl, ms, f"{r.ratio:.2f}", copies, f"{r.bandwidth / 1e9:.1f}", saved])
    headers = ["shape", "implementation", "median ms", "x native", "x copy time", "copy GB/s", "kept: all / new"]
    caption = "training: forward + backward" if mode == "train" else "evaluation: forward"
    return Table(headers, rows, caption=caption)


def roofline_table(shape: tuple[int, ...], impls: list[str], device: str, rounds: int, threads: int) -> Table:
    """Each kernel's median time over two floors: its least bytes, each phase at the rate of the
    STREAM-like kernels with the same mix of reads and writes, and at the fastest rate of all."""
    roof = roofline.run(shape, impls, device, rounds, 512 if device == "cpu" else 4096, threads=threads)
    rows = [
        [
            i,
            k,
            f"{roof.seconds[f'{i} {k}'] * 1e3:.2f}",
            f"{roof.floor_s(k) * 1e3:.2f}",
            f"{roof.over_floor(i, k):.1f}",
            f"{roof.over_floor(i, k, matched=False):.1f}",
        ]
        for i in impls
        for k in roofline.KERNELS
        if f"{i} {k}" in roof.seconds
    ]
    streams = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in roof.bandwidths.items())
    caption = (
        f"roofline at {_shape(shape)}: GB/s {streams}; matrix product "
        f"{roof.flops_per_s / 1e9:.1f} GFLOP/s, balance {roof.balance:.2f} flops/byte (fastest rate)"
    )
    headers = ["implementation", "kernel", "median ms", "floor ms", "x floor", "x fastest-rate floor"]
    return Table(headers, rows, caption=caption)


def check_targets(results: list[timing.Result], conv_shapes) -> list[tuple[str, bool]]:
    by = {(r.shape, r.impl): r for r in results if r.mode == "train"}
    checks = []
    for shape in map(tuple, conv_shapes):
        for impl, limit in TARGETS.items():
            if (shape, impl) in by:
                ratio = by[shape, impl].ratio
                checks.append((f"{_shape(shape)} {impl}: {ratio:.2f}x native <= {limit}", ratio <= limit))
        if (shape, "from ops") in by and (shape, "bnlib") in by:
            speed = by[shape, "from ops"].median_s / by[shape, "bnlib"].median_s
            checks.append(
                (f"{_shape(shape)} bnlib {speed:.2f}x faster than from ops >= {FROM_OPS_OVER_BNLIB}", speed >= 2.0)
            )
        if (shape, "bnlib") in by:
            _, new = by[shape, "bnlib"].saved
            text = f"{_shape(shape)} bnlib keeps {new:.2f} new input-sized tensors for backward <= 1"
            checks.append((text, new <= 1.01))
    return checks


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per shape (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as in the book)")
    parser.add_argument("--quick", action="store_true", help="one conv shape, 5 rounds, no compile")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile path")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    conv_shapes = timing.CONV_SHAPES[:1] if args.quick else timing.CONV_SHAPES
    shapes = timing.MLP_SHAPES + conv_shapes
    rounds = 5 if args.quick else args.rounds
    impls = [i for i in timing.IMPLEMENTATIONS if not ((args.quick or args.no_compile) and i == "compiled")]

    print(f"torch {torch.__version__}, float32, {args.threads} CPU thread(s), median of {rounds} interleaved rounds")
    print("Timings depend on the machine and on its load at the time: compare the ratios (same run).\n")
    all_ok = True
    for device in devices:
        print(f"== {device}" + (f": {torch.cuda.get_device_name()}" if device == "cuda" else ""))
        if "compiled" in impls:
            cost, in_use = timing.compile_cost(conv_shapes[0], device)
            status = "compiled" if in_use else f"NOT compiled, eager fallback: {compiled.available()[1]}"
            where = _shape(conv_shapes[0])
            print(f"torch.compile, one-time cost of the first training step at {where}: {cost:.1f} s ({status})")
        dev_impls = [i for i in impls if not (i == "numpy" and device != "cpu")]
        results = timing.run(shapes, ("train", "eval"), dev_impls, device, rounds, args.threads)
        print()
        print(table(results, "train"))
        print()
        print(table(results, "eval"))
        print("\nkept for backward: distinct tensors the autograd graph saves, in input sizes; 'new' leaves out the")
        print("input itself. x copy time: time / the time of a plain copy of the input timed in the same rounds")
        print("(copy GB/s), a yardstick, not a bound.\n")
        roof_impls = [i for i in ("native", "bnlib", "compiled") if i in dev_impls]
        print(roofline_table(conv_shapes[0], roof_impls, device, rounds, args.threads))
        for groups, label in ((1, "3x3 conv"), (64, "depthwise 3x3 conv")):
            f = timing.fold_speedup(channels=64, batch=8, size=32, groups=groups, device=device, rounds=rounds)
            print(
                f"eval, {label} on (8, 64, 32, 32): conv+BN {f['conv+bn'] * 1e3:.2f} ms, "
                f"folded {f['folded'] * 1e3:.2f} ms, speed-up {f['speedup']:.2f}x "
                f"(max |difference| {f['max_diff']:.1e} in float32, "
                f"{f['max_diff_default']:.1e} at the default precision, TF32 on recent GPUs)"
            )
        print("\ntargets (training, conv shapes):")
        for text, ok in check_targets(results, conv_shapes):
            all_ok &= ok
            print(f"  [{'ok' if ok else 'MISSED'}] {text}")
        print()
    print("all targets hold" if all_ok else "some targets missed (timings under load vary: see the ratios above)")
    return 1 if (args.strict and not all_ok) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
