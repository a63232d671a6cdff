"""One decode shape of the benchmark table, launched a few times, for Nsight Compute.

    PYTHONPATH=. ncu --clock-control none -k regex:hopper --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        python3 benchmarks/profile_decode.py --heads 16 --batch 128 --length 16384 [--varlen] [--s-q 2]

The inputs are bench_decode's (bf16, d = 576/512, page 64, pages permuted, lengths = L or uniform in
[L/2, L]); the launch is scheduled_decode's with its plan made ahead, as the table times it, so the
schedule, split and merge kernels each run `--calls` times (`-k regex:'schedule|hopper|merge'` and
--launch-count 3 profiles all three of one call).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode import DV, SCALE, make_inputs  # noqa: E402
from mla_verify.kernels import scheduled_decode as sd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--s-q", type=int, default=1)
    parser.add_argument("--varlen", action="store_true")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--cut-cost-tokens", type=float, default=None,
                        help="the plan's price of cutting (1e30: whole sequences, -1e30: one wave of parts)")
    args = parser.parse_args()
    q, cache, table, lengths = make_inputs(args.batch, args.s_q, args.heads, args.length, args.varlen, seed=0)
    plan = sd.plan_decode(q, cache, lengths, DV)
    if args.cut_cost_tokens is not None:
        plan = dataclasses.replace(plan, cut_cost_tokens=args.cut_cost_tokens)
    for _ in range(args.calls):
        sd.launch_decode(q, cache, table, lengths, DV, SCALE, args.s_q > 1, plan)
    torch.cuda.synchronize()
    print(f"h={args.heads} b={args.batch} L={args.length} s_q={args.s_q} varlen={args.varlen}: "
          f"{args.calls} calls, {plan}", flush=True)


if __name__ == "__main__":
    main()
