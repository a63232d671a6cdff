"""Time the float64 reference decode core on a DeepSeek-V3-shaped decode step (CPU).

    python benchmarks/bench_reference.py [--length 4096] [--heads 128] [--repeats 10]

One step: b=1, s_q=1, h=128, d=576 (d_c=512 + d_r=64), L=4096, bf16 inputs, page 64, pages permuted.
Prints the median and the minimum over the repeats, and the same for the certifier's full check
(reference plus per-element error bounds).
"""

import argparse
import statistics
import time

import torch

from mla_verify.decode.bounds import RoundingModel, decode_bounds
from mla_verify.reference import paged_decode_reference, paged_decode_terms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    page, d, dv = 64, 576, 512
    blocks = -(-args.length // page)
    q = torch.randn(1, 1, args.heads, d, generator=g).bfloat16()
    cache = torch.randn(blocks, page, 1, d, generator=g).bfloat16()
    table = torch.randperm(blocks, generator=g).int()[None]
    lengths = torch.tensor([args.length], dtype=torch.int32)
    scale = 0.1352337

    def reference():
        paged_decode_reference(q, cache, table, lengths, dv, scale)

    def reference_with_bounds():
        terms = paged_decode_terms(q, cache, table, lengths, dv, scale)
        decode_bounds(terms, q, scale, dv, RoundingModel(input=torch.bfloat16, accumulation=torch.float32,
                                                        output=torch.bfloat16, p=torch.bfloat16))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; b=1 s_q=1 h={args.heads} d={d} "
          f"L={args.length} bf16 page {page}")
    for name, fn in (("reference decode core", reference), ("reference + error bounds", reference_with_bounds)):
        fn()
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        print(f"{name:26} median {statistics.median(times) * 1e3:7.1f} ms   min {min(times) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
