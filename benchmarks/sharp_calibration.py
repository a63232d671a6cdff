"""What separates correct kernels from subtle bugs at serving shapes, measured through the verdicts.

For each implementation and each case of the grid (bf16, d = 576/512, page 64, b = 4 with lengths
L, L−1, L−37, L/2+1, unit data, h ∈ {16, 128}, L ∈ {4k, 16k, 32k}, scale 1/√d and DeepSeek-V3's),
runs the decode kernel once and reports: max |Δlse|, the largest relative RMS output error of a
row, cosine distance, and the ratios of both tiers (sound: worst element / bound; sharp: lse and
row error norm / tolerance), and which tier, if any, fails it. Run:

    PYTHONPATH=tests python benchmarks/sharp_calibration.py --impl torch --impl zoo.legit:online_exp2_tiles \
        --impl zoo.subtle:scale_off_by_1e3 [--device cuda] [--heads 16 128] [--lengths 4096 16384 32768] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from mla_verify.certify.registry import resolve
from mla_verify.decode.case import DecodeCase
from mla_verify.decode.checks import CaseFailure, call_kernel, compare, expected_for
from mla_verify.decode.inputs import build_inputs
from mla_verify.rounding import worst_ratio

SCALES = ("inverse_sqrt_d", "deepseek_v3")


def grid(heads: list[int], lengths: list[int], device: str, regime: str = "unit") -> list[DecodeCase]:
    return [DecodeCase(dtype="bfloat16", batch=4, s_q=1, heads=h, d=576, head_dim_v=512, page_size=64,
                       lengths=(n, n - 1, n - 37, n // 2 + 1), causal=False, regime=regime, scale=scale,
                       permute_pages=True, strided_cache=False, extra_blocks=0, seed=n + h, layout_seed=1,
                       device=device)
            for h in heads for n in lengths for scale in SCALES]


def measure(impl, case: DecodeCase) -> dict:
    inputs = build_inputs(case)
    started = time.perf_counter()
    observed = call_kernel(impl, inputs)
    seconds = time.perf_counter() - started
    expected = expected_for(inputs, impl.capabilities)
    out, lse = observed.out.double().cpu(), observed.lse.double().cpu()
    ref_out, ref_lse = expected.out.cpu(), expected.lse.cpu()
    row_error = (out - ref_out).norm(dim=-1)
    row_norm = ref_out.norm(dim=-1)
    cosine = 1 - (out * ref_out).sum(-1) / (out.norm(dim=-1) * row_norm).clamp_min(1e-300)
    lse_error = (lse - ref_lse).abs()
    result = {"impl": impl.name, "heads": case.heads, "length": case.lengths[0], "scale": case.scale,
              "max_lse_error": float(lse_error.max()), "max_relative_rms": float((row_error / row_norm).max()),
              "max_cosine_distance": float(cosine.max()), "kernel_seconds": round(seconds, 4),
              "sound": max(worst_ratio((out - ref_out).abs(), expected.out_bound.cpu())[0],
                           worst_ratio(lse_error, expected.lse_bound.cpu())[0]),
              "sharp": max(worst_ratio(row_error, expected.sharp_out.cpu())[0],
                           worst_ratio(lse_error, expected.sharp_lse.cpu())[0])}
    try:
        compare(observed, expected, impl.capabilities, case)
        result["verdict"] = "pass"
    except CaseFailure as failure:
        tier = "sharp" if "sharp tier" in failure.finding.message else "sound"
        result["verdict"] = f"FAIL ({failure.finding.kind.value}, {tier} tier)"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", action="append", required=True, help="registered name or module:attr")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--regime", default="unit", help="the cases' data regime (mla_verify.decode.case.REGIMES)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    print("| implementation | h | L | scale | max abs lse error | max rel. RMS | max cos. dist. | sound | sharp | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in grid(args.heads, args.lengths, args.device, args.regime):
        for spec in args.impl:
            row = measure(resolve(spec), case)
            rows.append(row)
            print(f"| {row['impl']} | {row['heads']} | {row['length']} | {row['scale']} | {row['max_lse_error']:.2e} | "
                  f"{row['max_relative_rms']:.2e} | {row['max_cosine_distance']:.1e} | {row['sound']:.3g} | "
                  f"{row['sharp']:.3g} | {row['verdict']} |", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in r.items()}
                       for r in rows], handle, indent=1)


if __name__ == "__main__":
    main()
