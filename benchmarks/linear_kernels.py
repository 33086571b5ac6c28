"""fp32 CPU linears at decoding shapes: `F.linear` (MKL sgemm on the weight as stored) against
oneDNN on the weight reordered for it (`alignkit/rollout/packed_linear.py`, what HFGenerator
decodes with in fp32 on x86). The default model's shapes (hidden 576, MLP 1536, K/V 192,
vocabulary 49152), for a few row counts; milliseconds per product, best of --repeats.

    python benchmarks/linear_kernels.py
    python benchmarks/linear_kernels.py --rows 1,16,128,512 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignkit.rollout.packed_linear import ROWS_HINT, available, packed_forward  # noqa: E402
from benchmarks._common import machine  # noqa: E402

SHAPES = {"q/o projection": (576, 576), "k/v projection": (576, 192), "gate/up projection": (576, 1536),
          "down projection": (1536, 576), "output head": (576, 49152)}


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,128,512")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not available():
        sys.exit("no oneDNN linear path here (x86 CPU with PyTorch's oneDNN needed)")
    torch.set_num_threads(args.threads)
    print(f"{machine(args.threads)}; fp32, ms per product (best of {args.repeats})")
    print(f"{'product':<20}{'rows':>6}{'F.linear':>10}{'oneDNN':>9}{'speed-up':>10}{'reorder':>9}")
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            w = torch.randn(n, k)
            reorder = best_ms(lambda: torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT), 3)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k)
                mkl = best_ms(lambda: torch.nn.functional.linear(x, w), args.repeats)
                dnn = best_ms(lambda: packed_forward(x, packed, None, n), args.repeats)
                print(f"{name:<20}{rows:>6}{mkl:>10.2f}{dnn:>9.2f}{mkl / dnn:>9.2f}x{reorder:>9.2f}")


if __name__ == "__main__":
    main()
