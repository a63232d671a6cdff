"""GPU check and benchmark of the Triton MLA decode kernels (scheduled_decode, beside the fixed-split
triton_decode it replaces) against the PyTorch baseline and the peers.

    PYTHONPATH=. python3 benchmarks/bench_decode.py [--check] [--sweep [NAME ...]] [--no-bench] [--no-peers]
                                                    [--out DIR]

--check   correctness on the GPU: bf16/fp16/fp32 cases (widths 576/512, 288/256 and small ones,
          heads 1..128, s_q 1..8, pages 1..256, causal, strided cache, NaN-poisoned unused slots,
          int32-max unused block ids) judged by the suite's check_case (float64 reference on the
          GPU, derived error bound), plus bit-identical repeat calls.
--sweep   times what the kernels' constants were chosen from (all sweeps, or those named):
          configs       tl configs and part counts on the headline shapes (decode_config's heuristic);
          few-rows      the Hopper few-rows kernel against the rows padded to 64 and the tl kernel;
          whole-or-cut  the Hopper plan's whole sequences against one wave of parts (CUT_COST_TOKENS);
          batch-one     b = 1: the minimum part size.
default   the benchmark table: DeepSeek-V3 absorbed decode (d=576, head_dim_v=512), bf16, page 64,
          pages permuted, random data; h=16 (TP8) and h=128 (TP1); b in {1, 128}; L in {4096, 16384};
          s_q in {1, 2} (s_q=2 causal); fixed lengths (all = L) and varlen (uniform in [L/2, L]).
            graph µs   GPU time per call under CUDA-graph replay (input copies rotated when one set
                       would sit in L2): the GB/s, TFLOP/s and fractions use it;
            eager µs   launch_decode with the plan made ahead, triton.testing.do_bench median;
            fixed-split the registered `triton` kernel (triton_decode: fixed splits, host-made
                       plan), same replay, speed-up = its time / the scheduled kernel's;
            peers      vLLM's Triton MLA decode (its backend's call: s_q tokens as rows, 4 KV splits)
                       and FlashMLA's dense decode (metadata made ahead) when importable, same
                       replay, (their time / ours);
            API ms     triton_paged_decode per call as a caller sees it (validation's host syncs,
                       Python, three launches); torch API ms the same for torch_paged_decode.
          Device ceilings measured in the same run: a device-to-device copy (bytes read + written)
          and an 8192³ bf16 matmul.
Bytes = latent cache read once (Σ lengths·d·2) + q + out; FLOP = 2·s_q·Σ lengths·h·(d + head_dim_v).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mla_verify.impls.torch_decode import torch_paged_decode  # noqa: E402
from mla_verify.kernels import hopper_decode as hd  # noqa: E402
from mla_verify.kernels import scheduled_decode as sd  # noqa: E402
from mla_verify.kernels import triton_decode as td  # noqa: E402

D, DV, PAGE = 576, 512, 64
SCALE = 192 ** -0.5 * (1 + 0.1 * math.log(40)) ** 2  # DeepSeek-V3 with YaRN
GRAPH_L2_BYTES = 256 * 2**20  # rotate graph inputs over at least this many bytes
WAVES_B1 = 1  # the b = 1 sweep: parts for one wave of resident programs


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


# ----------------------------------------------------------------------------------------------
# Contenders: each prepares, for one shape, a call with everything allocated ahead (no host sync)
# ----------------------------------------------------------------------------------------------

def prepare_triton(module, q, cache, table, lengths, causal, **plan_args):
    """The project's kernel (or a previous version of its file): plan made ahead, launch only."""
    plan = module.plan_decode(q, cache, lengths, DV, **plan_args)
    return lambda: module.launch_decode(q, cache, table, lengths, DV, SCALE, causal, plan)


def prepare_vllm(q, cache, table, lengths, causal):
    """vLLM's Triton MLA decode as its backend calls it: s_q tokens flattened into rows, 4 KV splits."""
    from mla_verify.adapters import expand_query_rows
    from mla_verify.adapters.vllm import NUM_KV_SPLITS, _decode_attention_fwd, scratch_shape

    fwd = _decode_attention_fwd()
    b, s_q, h, _ = q.shape
    table_rows, lengths_rows = expand_query_rows(table, lengths, s_q, causal)
    o = torch.empty(b * s_q, h, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(b * s_q, h, dtype=torch.float32, device=q.device)
    logits = torch.empty(scratch_shape(b * s_q, h, NUM_KV_SPLITS, DV), dtype=torch.float32, device=q.device)
    q_rows = q.flatten(0, 1)
    return lambda: fwd(q_rows, cache, cache[..., :DV], o, lse, table_rows, lengths_rows, logits, NUM_KV_SPLITS,
                       SCALE, page_size=PAGE)


def prepare_flashmla(q, cache, table, lengths, causal):
    """FlashMLA's dense decode with its scheduling metadata made ahead (reused: same shapes and lengths)."""
    import flash_mla

    from mla_verify.adapters.flashmla import metadata_arguments

    metadata, num_splits = flash_mla.get_mla_metadata(*metadata_arguments(lengths, q.shape[1], q.shape[2], 1))
    return lambda: flash_mla.flash_mla_with_kvcache(q, cache, table, lengths, DV, metadata, num_splits,
                                                    softmax_scale=SCALE, causal=causal)


def available_peers() -> dict:
    peers = {}
    for name, module, prepare in (("vllm", "vllm", prepare_vllm), ("flashmla", "flash_mla", prepare_flashmla)):
        try:
            __import__(module)
            peers[name] = prepare
        except Exception as error:  # noqa: BLE001 - a peer that does not import is left out, and said so
            print(f"peer {name} not measured: {type(error).__name__}: {error}", flush=True)
    return peers


def graph_ms(prepare, b: int, s_q: int, h: int, length: int, varlen: bool, causal: bool) -> float:
    """GPU ms per call under CUDA-graph replay; several input copies (>= 256 MiB together) are
    replayed in turn when one set would sit in L2."""
    one = make_inputs(b, s_q, h, length, varlen, seed=0)
    copies = max(1, min(64, -(-GRAPH_L2_BYTES // (one[1].nbytes + one[0].nbytes))))
    calls = [prepare(*one, causal)] + [prepare(*make_inputs(b, s_q, h, length, varlen, seed=i), causal)
                                       for i in range(1, copies)]
    for call in calls:  # compile, build metadata and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / copies)
    del graph, calls
    torch.cuda.empty_cache()
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Benchmark table
# ----------------------------------------------------------------------------------------------

TABLE_SHAPES = [(h, b, length, s_q, varlen) for h in (16, 128) for b in (1, 128) for length in (4096, 16384)
                for s_q in (1, 2) for varlen in (False, True)]


def bench_table(copy_gbs: float, matmul_tflops: float, baseline, peers: dict) -> list[dict]:
    rows = []
    for shape in TABLE_SHAPES:
        rows.append(bench_shape(*shape, copy_gbs, matmul_tflops, baseline, peers))
        print(_row_line(rows[-1], peers, baseline is not None), flush=True)
    return rows


def bench_shape(h: int, b: int, length: int, s_q: int, varlen: bool, copy_gbs: float, matmul_tflops: float,
                baseline, peers: dict) -> dict:
    causal = s_q > 1
    q, cache, table, lengths = make_inputs(b, s_q, h, length, varlen, seed=1234)
    args = (q, cache, table, lengths, DV, SCALE, causal)
    out, _ = sd.scheduled_paged_decode(*args)
    ref_out, _ = torch_paged_decode(*args)
    rel = float((out.float() - ref_out.float()).norm() / ref_out.float().norm())
    del ref_out
    torch.cuda.empty_cache()
    nbytes, flop = traffic(q, lengths, h, s_q)
    row = dict(h=h, b=b, L=length, s_q=s_q, varlen=varlen, rel=rel,
               parts=sd.plan_decode(q, cache, lengths, DV).num_parts)
    row["ms"] = _bench(prepare_triton(sd, q, cache, table, lengths, causal))
    row["graph"] = graph_ms(lambda *a: prepare_triton(sd, *a), b, s_q, h, length, varlen, causal)
    row["gbs"] = nbytes / row["graph"] / 1e6
    row["tflops"] = flop / row["graph"] / 1e9
    row["bw_frac"], row["mm_frac"] = row["gbs"] / copy_gbs, row["tflops"] / matmul_tflops
    if baseline is not None:
        row["baseline"] = graph_ms(lambda *a: prepare_triton(baseline, *a), b, s_q, h, length, varlen, causal)
    for name, prepare in peers.items():
        try:
            row[name] = graph_ms(prepare, b, s_q, h, length, varlen, causal)
        except Exception as error:  # noqa: BLE001 - a peer refusing a shape is recorded, not fatal
            print(f"  {name} failed on this shape: {type(error).__name__}: {str(error)[:120]}", flush=True)
            row[name] = None
    row["api_ms"] = _bench(lambda: sd.scheduled_paged_decode(*args))
    row["torch_ms"] = _bench(lambda: torch_paged_decode(*args), warmup=3, rep=30)
    torch.cuda.empty_cache()
    return row


def _header(peers: dict, baseline: bool) -> str:
    extra = (["fixed-split `triton` graph µs", "speed-up"] if baseline else []) + [f"{p} graph µs" for p in peers]
    return ("| h | b | L | s_q | lengths | graph µs | eager kernel µs | GB/s | TFLOP/s | % copy BW | % matmul | "
            + " | ".join(extra + ["API ms", "torch API ms", "parts", "rel err vs torch"]) + " |")


def _row_line(r: dict, peers: dict, baseline: bool) -> str:
    lengths = "U[L/2,L]" if r["varlen"] else "= L"
    cells = [r["h"], r["b"], r["L"], r["s_q"], lengths, f"{1e3 * r['graph']:.1f}", f"{1e3 * r['ms']:.1f}",
             f"{r['gbs']:.0f}", f"{r['tflops']:.1f}", f"{100 * r['bw_frac']:.1f}", f"{100 * r['mm_frac']:.1f}"]
    if baseline:
        cells += [f"{1e3 * r['baseline']:.1f}", f"{r['baseline'] / r['graph']:.2f}×"]
    cells += [f"{1e3 * r[p]:.1f} ({r[p] / r['graph']:.2f}×)" if r.get(p) else "—" for p in peers]
    cells += [f"{r['api_ms']:.3f}", f"{r['torch_ms']:.3f}", r["parts"], f"{r['rel']:.1e}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ----------------------------------------------------------------------------------------------
# Config and plan sweep
# ----------------------------------------------------------------------------------------------

def sweep_configs() -> None:
    """Candidate tl configs and part counts (waves of resident slots) on the shapes the heuristic and
    the plan's constants are chosen for (GPU µs under graph replay)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    candidates = {
        # memory-bound, 16 rows: how many waves of parts
        (16, 128, 16384, 1): [td.decode_config(torch.bfloat16, 16, D, DV)],
        # 32 rows (h=16, s_q=2): mma.sync tiles of 32 rows vs 64-row wgmma tiles half padding
        (16, 128, 4096, 2): [td.DecodeConfig(32, 64, 8, 3), td.DecodeConfig(64, 64, 8, 2)],
        # compute-bound: the Hopper kernel (config None: the plan's own choice)
        (128, 128, 4096, 1): [None],
    }
    for (h, b, length, s_q), configs in candidates.items():
        causal = s_q > 1
        print(f"\nsweep h={h} b={b} L={length} s_q={s_q}", flush=True)
        for config in configs:
            results = []
            for waves in (1, 2, 3):
                resident = config.resident_per_sm if config else 1
                groups = triton.cdiv(s_q * h, config.block_m if config else 64)
                parts = max(1, waves * resident * sms // groups)
                try:
                    prepare = lambda *a, c=config, p=parts: prepare_triton(sd, *a, num_parts=p, config=c)  # noqa: E731
                    ms = graph_ms(prepare, b, s_q, h, length, False, causal)
                    results.append(f"{waves} waves ({parts} parts) {1e3 * ms:7.1f} µs")
                except Exception as error:  # noqa: BLE001 - out of shared memory etc.: report and go on
                    results.append(f"failed: {type(error).__name__}: {str(error)[:80]}")
            name = f"{config.block_m} {config.block_n} {config.num_warps} {config.num_stages}" if config else "hopper"
            print(f"  {name}: " + " | ".join(results), flush=True)


def sweep_few_rows() -> None:
    """Few rows on Hopper: the transposed few-rows kernel (one or two warpgroups at 16 rows), the 8-warp
    kernel with the rows padded to 64, and the tl kernel; plans their own."""
    print("\nsweep: few rows, graph µs (% of copy BW): few-rows kernel, rows padded to 64, tl kernel", flush=True)
    copy_gbs = device_ceilings()[0]
    for h, b, length, s_q in ((16, 128, 16384, 1), (16, 128, 4096, 1), (16, 128, 4096, 2), (16, 1, 16384, 1),
                              (32, 128, 4096, 1), (8, 128, 16384, 1), (16, 64, 16384, 1)):
        for varlen in (False, True):
            nbytes = traffic(*make_inputs(b, s_q, h, length, varlen, seed=0)[::3], h, s_q)[0]
            variants = {"few-rows 1 wg": (hd.FEW_ROWS, 1), "few-rows 2 wg": (hd.FEW_ROWS, 2), "padded": (0, 1),
                        "tl": None}
            if s_q * h > 16:
                del variants["few-rows 1 wg"]
            cells = []
            for name, rows in variants.items():
                config = td.decode_config(torch.bfloat16, s_q * h, D, DV) if rows is None else None
                with _hopper_rows(*(rows or (hd.FEW_ROWS, hd.FEW_ROWS_WARPGROUPS[16]))):
                    ms = graph_ms(lambda *a, c=config: prepare_triton(sd, *a, config=c), b, s_q, h, length, varlen,
                                  s_q > 1)
                cells.append(f"{name} {1e3 * ms:.1f} ({100 * nbytes / ms / 1e6 / copy_gbs:.1f} %)")
            print(f"  h={h} b={b} L={length} s_q={s_q} varlen={varlen}: " + " | ".join(cells), flush=True)


def sweep_whole_or_cut() -> None:
    """The Hopper plan: whole sequences (a program each, no merge) or one wave of parts (a program
    walking each part's pieces), and the device's choice between them (CUT_COST_TOKENS)."""
    print("\nsweep: Hopper kernel, graph µs: the plan's choice | whole sequences | one wave of parts", flush=True)
    for h, b, length, s_q in ((16, 128, 16384, 1), (16, 128, 4096, 1), (16, 128, 4096, 2), (16, 64, 16384, 1),
                              (16, 200, 4096, 1), (128, 128, 16384, 1), (128, 128, 4096, 1), (128, 128, 4096, 2),
                              (128, 64, 4096, 1), (128, 200, 4096, 1)):
        for varlen in (False, True):
            cells = []
            for name, cost in (("plan", None), ("whole", 1e30), ("cut", -1e30)):
                def prepare(q, c, t, lens, causal, cost=cost):
                    plan = sd.plan_decode(q, c, lens, DV)
                    plan = plan if cost is None else dataclasses.replace(plan, cut_cost_tokens=cost)
                    return lambda: sd.launch_decode(q, c, t, lens, DV, SCALE, causal, plan)

                cells.append(f"{name} {1e3 * graph_ms(prepare, b, s_q, h, length, varlen, s_q > 1):.1f}")
            print(f"  h={h} b={b} L={length} s_q={s_q} varlen={varlen}: " + " | ".join(cells), flush=True)


def sweep_batch_one() -> None:
    """b = 1 on the tl kernel: how finely to cut one long sequence (the minimum part size)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("\nsweep h=16 b=1 L=16384 s_q=1: min part size", flush=True)
    config = td.decode_config(torch.bfloat16, 16, D, DV)
    for min_tokens in (32, 64, 128, 256):
        plan = sd.DecodePlan(config, WAVES_B1 * config.resident_per_sm * sms,
                             sd._overhead_units(config) + triton.cdiv(min_tokens, config.block_n))

        def prepare(q, c, t, lens, causal, plan=plan):
            return lambda: sd.launch_decode(q, c, t, lens, DV, SCALE, causal, plan)

        ms = graph_ms(prepare, 1, 1, 16, 16384, False, False)
        print(f"  min {min_tokens} keys: {1e3 * ms:.1f} µs", flush=True)


SWEEPS = {"configs": sweep_configs, "few-rows": sweep_few_rows, "whole-or-cut": sweep_whole_or_cut,
          "batch-one": sweep_batch_one}


@contextlib.contextmanager
def _hopper_rows(few_rows: int, warpgroups_16: int):
    """Temporarily route at most `few_rows` query rows to the few-rows kernel (0: pad every row count to
    64 on the 8-warp kernel), with `warpgroups_16` warpgroups for its 16-row tile."""
    saved = hd.FEW_ROWS, hd.FEW_ROWS_WARPGROUPS[16]
    hd.FEW_ROWS, hd.FEW_ROWS_WARPGROUPS[16] = few_rows, warpgroups_16
    try:
        yield
    finally:
        hd.FEW_ROWS, hd.FEW_ROWS_WARPGROUPS[16] = saved


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


def check(fn, quick: bool = False) -> bool:
    from mla_verify.decode.inputs import build_inputs
    from mla_verify.decode.checks import CaseFailure, Implementation, call_kernel, compare, expected_for

    impl = Implementation(name=fn.__name__, spec=f"{fn.__module__}:{fn.__name__}", fn=fn,
                          capabilities=td.CAPABILITIES)
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
            worst = max(worst, ratios.sound, ratios.sharp)
            print(f"  {status:4s} error/bound {ratios.sound:.3f} (sound) {ratios.sharp:.3f} (sharp)  {case.describe()}",
                  flush=True)
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
    parser.add_argument("--sweep", nargs="*", choices=sorted(SWEEPS), default=None,
                        help="time candidate configs, kernels and plans (all sweeps, or the ones named)")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    parser.add_argument("--no-peers", action="store_true", help="leave out vLLM and FlashMLA even if importable")
    parser.add_argument("--out", default=".", help="folder for decode_bench.md")
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    print(f"card: {name}; {torch.cuda.get_device_properties(0).multi_processor_count} SMs; torch {torch.__version__}; "
          f"triton {triton.__version__}", flush=True)
    ok = True
    if args.check or args.quick_check:
        for fn in (td.triton_paged_decode, sd.scheduled_paged_decode):
            print(f"check {fn.__module__}:", flush=True)
            ok = check(fn, quick=args.quick_check) and ok
    if args.sweep is not None:
        for name in args.sweep or SWEEPS:
            SWEEPS[name]()
    if args.no_bench:
        sys.exit(0 if ok else 1)
    baseline = td  # the fixed-split kernel the scheduled one replaces
    peers = {} if args.no_peers else available_peers()
    copy_gbs, matmul_tflops = device_ceilings()
    print(f"ceilings: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul 8192³ {matmul_tflops:.0f} TFLOP/s",
          flush=True)
    header = _header(peers, baseline is not None)
    rule = "|" + "---|" * (header.count("|") - 1)
    print(header + "\n" + rule, flush=True)
    rows = bench_table(copy_gbs, matmul_tflops, baseline, peers)
    table = "\n".join([header, rule] + [_row_line(r, peers, baseline is not None) for r in rows])
    summary = (f"card: {name}; copy {copy_gbs:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s; "
               f"min speed-up of the API over torch's {min(r['torch_ms'] / r['api_ms'] for r in rows):.1f}×")
    for peer in peers:
        ratios = [r[peer] / r["graph"] for r in rows if r.get(peer)]
        if ratios:
            summary += f"; {peer} time / ours: {min(ratios):.2f}–{max(ratios):.2f}"
    print("\n" + summary)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_bench.md"), "w") as f:
        f.write(summary + "\n\n" + table + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
