"""GPU check and benchmark of the Triton MLA decode kernel against the PyTorch baseline.

    PYTHONPATH=. python3 benchmarks/bench_decode.py [--check] [--sweep] [--no-bench] [--out DIR]

--check   correctness on the GPU: bf16/fp16/fp32 cases (widths 576/512, 288/256 and small ones,
          heads 1..128, s_q 1..8, pages 1..256, causal, strided cache, NaN-poisoned unused slots,
          int32-max unused block ids) judged by the suite's check_case (float64 reference on the
          GPU, derived error bound), plus bit-identical repeat calls.
--sweep   times the split kernel's candidate configs on the headline shapes (what decode_config's
          heuristic was chosen from).
default   the benchmark table: DeepSeek-V3 absorbed decode (d=576, head_dim_v=512), bf16, page 64,
          pages permuted, random data; h=16 (TP8) and h=128 (TP1); b in {1, 32, 128};
          L in {1024, 4096, 16384}; s_q in {1, 2} (s_q=2 causal); fixed lengths (all = L) and
          varlen (uniform in [L/2, L]). All eager times are medians of triton.testing.do_bench
          (L2 flushed before each call):
            kernel ms  launch_decode with the plan made ahead (the two kernels, no host sync): the
                       GB/s, TFLOP/s and fractions use this time;
            API ms     triton_paged_decode per call as a caller sees it (validation's and the
                       plan's host syncs, Python, two launches);
            torch ms   torch_paged_decode per call (also with its host syncs); speedup = torch ms /
                       API ms, like for like.
          For b=1 (launch-bound) the table adds CUDA-graph replay of launch_decode, rotating over
          enough input copies (>= 256 MiB) that the cache does not sit in L2.
          Device ceilings measured in the same run: a device-to-device copy (bytes read + written)
          and an 8192³ bf16 matmul.
Bytes = latent cache read once (Σ lengths·d·2) + q + out; FLOP = 2·s_q·Σ lengths·h·(d + head_dim_v).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mla_verify.impls.torch_decode import torch_paged_decode  # noqa: E402
from mla_verify.kernels import triton_decode as td  # noqa: E402

D, DV, PAGE = 576, 512, 64
SCALE = 192 ** -0.5 * (1 + 0.1 * math.log(40)) ** 2  # DeepSeek-V3 with YaRN
GRAPH_L2_BYTES = 256 * 2**20  # rotate graph inputs over at least this many bytes


# ----------------------------------------------------------------------------------------------
# Ceilings and timing
# ----------------------------------------------------------------------------------------------

def _bench(fn, warmup: int = 10, rep: int = 60) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def device_ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, dense bf16 matmul TFLOP/s), both on random data."""
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), rep=200)
    copy = 2 * src.nbytes / ms / 1e6
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b, rep=300)
    return copy, 2 * n**3 / ms / 1e9


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_inputs(b: int, s_q: int, h: int, length: int, varlen: bool, seed: int, dtype=torch.bfloat16):
    """Random q and paged cache (pages in random physical order, unused table entries int32 max)."""
    g = torch.Generator().manual_seed(seed)
    if varlen:
        lengths = torch.randint(length // 2, length + 1, (b,), generator=g, dtype=torch.int32)
    else:
        lengths = torch.full((b,), length, dtype=torch.int32)
    max_blocks = -(-length // PAGE)
    blocks = (-(-lengths // PAGE)).tolist()
    num_blocks = sum(blocks)
    physical = torch.randperm(num_blocks, generator=g).int()
    table = torch.full((b, max_blocks + 1), 2**31 - 1, dtype=torch.int32)
    start = 0
    for row, n in enumerate(blocks):
        table[row, :n] = physical[start:start + n]
        start += n
    cache = torch.randn(num_blocks, PAGE, 1, D, device="cuda", dtype=dtype)
    q = torch.randn(b, s_q, h, D, device="cuda", dtype=dtype)
    return q, cache, table.cuda(), lengths.cuda()


def traffic(q, lengths, h: int, s_q: int) -> tuple[float, float]:
    """(bytes, FLOP) of one decode call (cache read once)."""
    total = int(lengths.sum())
    element = q.element_size()
    nbytes = total * D * element + q.numel() * element + q.shape[0] * s_q * h * DV * element
    return nbytes, 2.0 * s_q * total * h * (D + DV)


def graph_time(b: int, s_q: int, h: int, length: int, varlen: bool, causal: bool) -> float:
    """ms per launch_decode, CUDA-graph replay over rotated input copies (cold L2)."""
    one = make_inputs(b, s_q, h, length, varlen, seed=0)
    per_set = one[1].nbytes + one[0].nbytes
    copies = max(1, min(64, -(-GRAPH_L2_BYTES // per_set)))
    sets = [one] + [make_inputs(b, s_q, h, length, varlen, seed=i) for i in range(1, copies)]
    plans = [td.plan_decode(q, c, lens, DV) for q, c, _, lens in sets]
    for (q, c, t, lens), plan in zip(sets, plans):  # compile and warm up outside the capture
        td.launch_decode(q, c, t, lens, DV, SCALE, causal, plan)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for (q, c, t, lens), plan in zip(sets, plans):
            td.launch_decode(q, c, t, lens, DV, SCALE, causal, plan)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / copies)
    return statistics.median(times[2:])


# ----------------------------------------------------------------------------------------------
# Benchmark table
# ----------------------------------------------------------------------------------------------

def bench_table(copy_gbs: float, matmul_tflops: float) -> list[dict]:
    rows = []
    for h in (16, 128):
        for b in (1, 32, 128):
            for length in (1024, 4096, 16384):
                for s_q in (1, 2):
                    for varlen in (False, True):
                        rows.append(bench_shape(h, b, length, s_q, varlen, copy_gbs, matmul_tflops))
                        print(_row_line(rows[-1]), flush=True)
    return rows


def bench_shape(h: int, b: int, length: int, s_q: int, varlen: bool, copy_gbs: float, matmul_tflops: float) -> dict:
    causal = s_q > 1
    q, cache, table, lengths = make_inputs(b, s_q, h, length, varlen, seed=1234)
    args = (q, cache, table, lengths, DV, SCALE, causal)
    out, lse = td.triton_paged_decode(*args)
    ref_out, ref_lse = torch_paged_decode(*args)
    rel = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
    del ref_out, ref_lse
    plan = td.plan_decode(q, cache, lengths, DV)
    kernel_ms = _bench(lambda: td.launch_decode(*args, plan))
    api_ms = _bench(lambda: td.triton_paged_decode(*args))
    torch.cuda.empty_cache()
    torch_ms = _bench(lambda: torch_paged_decode(*args), warmup=3, rep=30)
    nbytes, flop = traffic(q, lengths, h, s_q)
    graph_ms = graph_time(b, s_q, h, length, varlen, causal) if b == 1 else None
    return dict(h=h, b=b, L=length, s_q=s_q, varlen=varlen, ms=kernel_ms, api_ms=api_ms, graph_ms=graph_ms,
                torch_ms=torch_ms, gbs=nbytes / kernel_ms / 1e6, tflops=flop / kernel_ms / 1e9,
                bw_frac=nbytes / kernel_ms / 1e6 / copy_gbs, mm_frac=flop / kernel_ms / 1e9 / matmul_tflops,
                speedup=torch_ms / api_ms, rel=rel, splits=plan.num_splits, config=plan.config)


HEADER = ("| h | b | L | s_q | lengths | kernel ms | graph ms | API ms | GB/s | TFLOP/s | % copy BW | % matmul | "
          "torch API ms | speedup (API) | splits | rel err vs torch |")


def _row_line(r: dict) -> str:
    graph = f"{r['graph_ms']:.4f}" if r["graph_ms"] is not None else "—"
    lengths = "U[L/2,L]" if r["varlen"] else "= L"
    return (f"| {r['h']} | {r['b']} | {r['L']} | {r['s_q']} | {lengths} | {r['ms']:.4f} | {graph} | {r['api_ms']:.3f} | "
            f"{r['gbs']:.0f} | {r['tflops']:.1f} | {100 * r['bw_frac']:.1f} | {100 * r['mm_frac']:.1f} | "
            f"{r['torch_ms']:.3f} | {r['speedup']:.1f}× | {r['splits']} | {r['rel']:.1e} |")


# ----------------------------------------------------------------------------------------------
# Config sweep
# ----------------------------------------------------------------------------------------------

SWEEP_SHAPES = ((16, 128, 16384, 1), (16, 128, 4096, 2), (16, 32, 16384, 1), (128, 128, 4096, 1), (16, 1, 16384, 1))


def sweep_configs(h: int, s_q: int) -> list[td.DecodeConfig]:
    """(block_n, num_warps, num_stages) candidates; block_m follows the rows (64 when compute-bound)."""
    if s_q * h > 32:
        return [td.DecodeConfig(64, n, 8, s) for n, s in ((16, 2), (16, 3), (32, 2), (32, 3), (64, 2))]
    m = max(16, s_q * h)
    return [td.DecodeConfig(m, n, w, s) for n, w, s in ((16, 4, 4), (32, 4, 3), (32, 8, 3), (32, 4, 4), (32, 8, 4),
                                                        (64, 8, 3))]


def sweep() -> None:
    """Each candidate config at the planned split count and at 2x and 4x it."""
    for h, b, length, s_q in SWEEP_SHAPES:
        causal = s_q > 1
        q, cache, table, lengths = make_inputs(b, s_q, h, length, False, seed=7)
        nbytes, flop = traffic(q, lengths, h, s_q)
        default = td.plan_decode(q, cache, lengths, DV)
        print(f"\nsweep h={h} b={b} L={length} s_q={s_q}: heuristic {default}", flush=True)
        for config in sweep_configs(h, s_q):
            planned = td.plan_decode(q, cache, lengths, DV, config=config).num_splits
            results = []
            for splits in (planned, 2 * planned, 4 * planned):
                plan = td.plan_decode(q, cache, lengths, DV, num_splits=splits, config=config)
                try:
                    td.launch_decode(q, cache, table, lengths, DV, SCALE, causal, plan)
                    torch.cuda.synchronize()
                    ms = _bench(lambda: td.launch_decode(q, cache, table, lengths, DV, SCALE, causal, plan), rep=40)
                except Exception as error:  # noqa: BLE001 - out of shared memory etc.: report and go on
                    results.append(f"failed: {type(error).__name__}: {str(error)[:80]}")
                    break
                results.append(f"{splits:3d} splits {ms:.4f} ms {nbytes / ms / 1e6:5.0f} GB/s {flop / ms / 1e9:5.1f} TF/s")
            print(f"  {config.block_m:2d} {config.block_n:2d} {config.num_warps} {config.num_stages}: "
                  + " | ".join(results), flush=True)


# ----------------------------------------------------------------------------------------------
# GPU correctness check
# ----------------------------------------------------------------------------------------------

def check_cases():
    from mla_verify.decode.case import DecodeCase

    def case(dtype, b, s_q, h, widths, page, lengths, causal, strided=False, regime="unit", seed=0):
        return DecodeCase(dtype=dtype, batch=b, s_q=s_q, heads=h, d=widths[0], head_dim_v=widths[1], page_size=page,
                          lengths=tuple(lengths), causal=causal, regime=regime, scale="deepseek_v3",
                          permute_pages=True, strided_cache=strided, extra_blocks=2, seed=seed, layout_seed=seed + 1,
                          device="cuda")

    real, minicpm = (576, 512), (288, 256)
    cases = []
    for dtype in ("bfloat16", "float16", "float32"):
        cases += [
            case(dtype, 3, 1, 16, real, 64, (0, 1, 1000), False),
            case(dtype, 2, 2, 128, real, 64, (64, 777), True, strided=True),
            case(dtype, 4, 1, 65, real, 16, (65, 0, 300, 1500), False),
            case(dtype, 2, 8, 16, real, 128, (200, 9), True),
        ]
    for h in (1, 3, 9, 17, 63, 126):
        cases.append(case("bfloat16", 2, 1 + h % 3, h, real, 64, (h * 7, 130), h % 2 == 1, strided=h > 20))
    cases += [
        case("bfloat16", 2, 4, 40, minicpm, 32, (100, 513), True),
        case("bfloat16", 3, 1, 20, (80, 64), 1, (40, 0, 17), False),
        case("bfloat16", 2, 2, 9, (40, 32), 7, (50, 13), True, strided=True),
        case("bfloat16", 2, 1, 3, (24, 8), 256, (600, 255), False),
        case("bfloat16", 2, 3, 5, (37, 21), 4, (30, 3), True),
        case("bfloat16", 2, 1, 16, real, 64, (900, 64), False, regime="extreme_positive"),
        case("bfloat16", 2, 1, 16, real, 64, (900, 64), False, regime="large"),
        case("float16", 2, 1, 16, real, 64, (900, 64), False, regime="tiny"),
        case("float32", 2, 2, 16, minicpm, 16, (90, 400), True, regime="extreme_negative"),
    ]
    return cases


def check(quick: bool = False) -> bool:
    from mla_verify.decode.inputs import build_inputs
    from mla_verify.decode.checks import CaseFailure, Implementation, call_kernel, compare, expected_for

    impl = Implementation(name="triton", spec="mla_verify.kernels.triton_decode:triton_paged_decode",
                          fn=td.triton_paged_decode, capabilities=td.CAPABILITIES)
    worst, failures = 0.0, 0
    started = time.perf_counter()
    cases = check_cases()
    if quick:
        cases = [c for c in cases if c.dtype == "bfloat16" and c.d == D][:6]
    for case in cases:
        try:
            inputs = build_inputs(case)
            first = call_kernel(impl, inputs)
            ratios = compare(first, expected_for(inputs, impl.capabilities), impl.capabilities, case)
            second = call_kernel(impl, inputs)
            identical = torch.equal(first.out, second.out) and torch.equal(
                first.lse.nan_to_num(), second.lse.nan_to_num())
            status = "ok" if identical else "FAIL (not bit-identical on repeat)"
            failures += not identical
            worst = max(worst, *ratios)
            print(f"  {status:4s} out/bound {ratios[0]:.3f} lse/bound {ratios[1]:.3f}  {case.describe()}", flush=True)
        except CaseFailure as failure:
            failures += 1
            print(f"  FAIL {failure}", flush=True)
    print(f"check: {len(cases)} cases, {failures} failures, max error/bound {worst:.3f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return failures == 0


# ----------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="GPU correctness cases first")
    parser.add_argument("--quick-check", action="store_true", help="only a few bf16 d=576 check cases")
    parser.add_argument("--sweep", action="store_true", help="time candidate configs on the headline shapes")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    parser.add_argument("--out", default=".", help="folder for decode_bench.md")
    args = parser.parse_args()
    import triton
    name = torch.cuda.get_device_name()
    print(f"card: {name}; {torch.cuda.get_device_properties(0).multi_processor_count} SMs; torch {torch.__version__}; "
          f"triton {triton.__version__}", flush=True)
    ok = check(quick=args.quick_check) if args.check or args.quick_check else True
    if args.sweep:
        sweep()
    if args.no_bench:
        sys.exit(0 if ok else 1)
    copy_gbs, matmul_tflops = device_ceilings()
    print(f"ceilings: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul 8192³ {matmul_tflops:.0f} TFLOP/s",
          flush=True)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    rows = bench_table(copy_gbs, matmul_tflops)
    table = "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [_row_line(r) for r in rows])
    min_speedup = min(r["speedup"] for r in rows)
    summary = (f"card: {name}; copy {copy_gbs:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s; "
               f"min speedup over torch {min_speedup:.1f}×")
    print("\n" + summary)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_bench.md"), "w") as f:
        f.write(summary + "\n\n" + table + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
