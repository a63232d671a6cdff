"""GPU check and timing of the Gluon Hopper split kernel (mla_verify.kernels.hopper_decode).

    PYTHONPATH=. python3 benchmarks/hopper_check.py [--out DIR] [--no-bench] [--quick]

1. Resources: the kernels compiled for this GPU (registers, spills, shared memory): the 8-warp kernel
   and the few-rows kernel's 32- and 16-row tiles.
2. Correctness: scheduled_decode's launch with the Hopper split kernel (its schedule and merge) against
   mla_verify's float64 reference (paged_decode_reference), beside the project's tl kernel on the same
   inputs. Cases: h 64 and 128, and 1, 8, 16 (fewer than 64 rows), s_q 1, 2 and 4 (causal), b 1..8,
   120-128 (the device schedule's whole-sequence branch) and 136-140 (one wave of parts, several
   sequences each), lengths 0, 1, 63, 64, 65, 1000, ... varied per sequence, pages permuted, unused block-table entries int32-max, NaN in every cache slot past a
   length and in every unused page, bf16 and fp16, part counts the plan's / 1 / 3 / 7. (Unwritten
   outputs are caught by the suite's poisoned allocator in `mla-verify certify`.) Reported: relative L2 error of out
   over the rows that see a key, max |Δlse| over them, and exact empty-row handling (out 0, lse -inf).
3. Timing (eager, triton.testing.do_bench median): h=128, b=128, L=4096 and 16384, s_q 1 and 2 (causal),
   bf16, page 64, pages permuted; the Hopper path (the plan's part count and twice it) and the tl
   kernel (its own config forced); an 8192³ bf16 torch matmul in the same run as the ceiling.
   FLOP = 2·s_q·Σlengths·h·(576+512).
The table is printed last; full results go to DIR/hopper_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mla_verify.kernels import hopper_decode as hd  # noqa: E402
from mla_verify.kernels import scheduled_decode as sd  # noqa: E402
from mla_verify.kernels import triton_decode as td  # noqa: E402
from mla_verify.reference import paged_decode_reference  # noqa: E402

D, DV, PAGE = 576, 512, 64
SCALE = 0.135234  # DeepSeek-V3's softmax scale


def log(*a):
    print(*a, flush=True)


def make_inputs(gen, b, s_q, h, lengths, dtype, page=PAGE, spare_pages=3, poison=True):
    """q, cache (NaN in slots past each length and in unused pages), permuted block table."""
    dev = "cuda"
    pages_per_seq = [max(1, -(-n // page)) for n in lengths]
    max_pages = max(pages_per_seq)
    num_blocks = sum(pages_per_seq) + spare_pages
    q = torch.randn(b, s_q, h, D, generator=gen, device=dev).to(dtype)
    cache = torch.randn(num_blocks, page, 1, D, generator=gen, device=dev).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
    table = torch.full((b, max_pages + 2), 2**31 - 1, dtype=torch.int32, device=dev)
    used = torch.zeros(num_blocks, dtype=torch.bool, device=dev)
    k = 0
    for i, n in enumerate(lengths):
        need = -(-n // page)
        ids = perm[k:k + pages_per_seq[i]]
        k += pages_per_seq[i]
        table[i, :need] = ids[:need]
        if poison:
            for p_i in range(need):
                blk = int(ids[p_i])
                used[blk] = True
                lo = n - p_i * page
                if lo < page:
                    cache[blk, max(lo, 0):] = float("nan")
    if poison:
        cache[~used] = float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    return q, cache, table, seqlens


def hopper_run(q, cache, table, seqlens, causal, num_parts=None):
    """The decode through scheduled_decode's launch with the Hopper split kernel (its plan must pick it)."""
    plan = sd.plan_decode(q, cache, seqlens, DV, num_parts=num_parts)
    assert plan.hopper, "the plan did not pick the Hopper kernel for a case it supports"
    return sd.launch_decode(q, cache, table, seqlens, DV, SCALE, causal, plan)


def tl_run(q, cache, table, seqlens, causal):
    """The same launch with the portable tl split kernel (a config given: the plan keeps the tl path)."""
    config = td.decode_config(q.dtype, q.shape[1] * q.shape[2], D, DV)
    plan = sd.plan_decode(q, cache, seqlens, DV, config=config)
    return lambda: sd.launch_decode(q, cache, table, seqlens, DV, SCALE, causal, plan), plan


def compare(out, lse, ref_out, ref_lse):
    """rel L2 error over rows with a key; max |Δlse| there; empty rows exact; NaN anywhere fails."""
    has = torch.isfinite(ref_lse)  # [b, h, s_q]
    has_o = has.permute(0, 2, 1)  # [b, s_q, h]
    o = out.double()
    nan = bool(torch.isnan(o).any() or torch.isnan(lse).any())
    num = (o[has_o] - ref_out[has_o]).norm()
    den = ref_out[has_o].norm()
    rel = float(num / den) if den > 0 else float(num)
    dl = float((lse.double()[has] - ref_lse[has]).abs().max()) if has.any() else 0.0
    empty_ok = True
    if (~has).any():
        empty_ok = bool((o[~has_o] == 0).all() and (lse[~has] == float("-inf")).all())
    return dict(rel=rel, dlse=dl, empty_ok=empty_ok, nan=nan)


CASES = [
    # (b, s_q, h, lengths, causal)
    (1, 1, 128, [1000], False),
    (1, 1, 64, [64], False),
    (3, 1, 128, [1, 63, 65], False),
    (4, 1, 64, [0, 64, 1000, 129], False),
    (8, 1, 128, [0, 1, 63, 64, 65, 1000, 2047, 300], False),
    (2, 2, 64, [1, 65], True),
    (5, 2, 128, [0, 1, 2, 64, 1000], True),
    (8, 2, 64, [63, 64, 65, 127, 128, 129, 1000, 4000], True),
    (3, 2, 128, [700, 0, 4096], False),
    (2, 1, 96, [130, 1000], False),  # 96 rows: a second, partly filled row group
    (2, 2, 65, [65, 9], True),  # 130 rows, causal
    # fewer than 64 rows, padded with zero rows
    (3, 1, 16, [0, 1, 1000], False),
    (2, 2, 16, [65, 4000], True),
    (4, 1, 1, [1, 64, 65, 300], False),
    (2, 4, 8, [200, 9], True),
    (1, 1, 16, [16384], False),
    # batches that fill the waves: the plan's own run takes whole sequences (one piece each)
    (128, 1, 16, [300] * 127 + [0], False),
    (120, 2, 32, [130] * 120, True),
    # more sequences than SMs, mixed lengths: the plan cuts one wave of parts, each program walking
    # several sequences' pieces
    (140, 1, 16, [(i * 37) % 700 for i in range(140)], False),
    (136, 2, 64, [(i * 53) % 400 for i in range(136)], True),
]


def check(args, results):
    gen = torch.Generator(device="cuda").manual_seed(1234)
    worst = dict(rel=0.0, dlse=0.0)
    worst_tl = dict(rel=0.0, dlse=0.0)
    failures = []
    rows = []
    cases = CASES[:4] if args.quick else CASES
    for dtype in (torch.bfloat16, torch.float16):
        for (b, s_q, h, lengths, causal) in cases:
            q, cache, table, seqlens = make_inputs(gen, b, s_q, h, lengths, dtype)
            assert hd.supports(q, cache, DV), "supports() refused a case it should take"
            ref_out, ref_lse = paged_decode_reference(q, cache, table, seqlens, DV, SCALE, causal)
            try:
                tl_out, tl_lse = tl_run(q, cache, table, seqlens, causal)[0]()
                tl_cmp = compare(tl_out, tl_lse, ref_out, ref_lse)
            except Exception as e:  # noqa: BLE001  (the tl kernel is another file's, maybe mid-edit)
                log("tl kernel failed:", repr(e)[:200])
                tl_cmp = dict(rel=float("nan"), dlse=float("nan"))
            for key in worst_tl:
                worst_tl[key] = max(worst_tl[key], tl_cmp[key])
            for splits in (None, 1, 3, 7):  # the plan's own part count, then forced ones
                out, lse = hopper_run(q, cache, table, seqlens, causal, splits)
                torch.cuda.synchronize()
                c = compare(out, lse, ref_out, ref_lse)
                tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
                ok = (not c["nan"]) and c["empty_ok"] and c["rel"] < tol and c["dlse"] < 1e-3
                # repeat: bit-identical (no race)
                out2, lse2 = hopper_run(q, cache, table, seqlens, causal, splits)
                same = bool(torch.equal(out2, out) and torch.equal(lse2, lse))
                ok = ok and same
                row = dict(dtype=str(dtype).replace("torch.", ""), b=b, s_q=s_q, h=h, lengths=lengths, causal=causal,
                           splits=splits, repeat_identical=same, tl_rel=tl_cmp["rel"], tl_dlse=tl_cmp["dlse"], **c,
                           ok=ok)
                rows.append(row)
                for key in worst:
                    worst[key] = max(worst[key], c[key])
                if not ok:
                    failures.append(row)
                    log("FAIL", row)
    results["check"] = dict(rows=rows, worst=worst, worst_tl=worst_tl, failures=len(failures))
    log(f"check: {len(rows)} runs, {len(failures)} failures; worst rel {worst['rel']:.2e} dlse {worst['dlse']:.2e} "
        f"(tl kernel on the same inputs: rel {worst_tl['rel']:.2e} dlse {worst_tl['dlse']:.2e})")
    return not failures


def matmul_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ bm, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def bench(args, results):
    mm = matmul_tflops()
    log(f"matmul 8192^3 bf16: {mm:.0f} TFLOP/s")
    gen = torch.Generator(device="cuda").manual_seed(7)
    table_rows = []
    for L in (4096, 16384):
        for s_q in (1, 2):
            b, h, causal = 128, 128, s_q == 2
            q, cache, table, seqlens = make_inputs(gen, b, s_q, h, [L] * b, torch.bfloat16, spare_pages=0,
                                                   poison=False)
            flop = 2 * s_q * b * L * h * (D + DV)
            default = sd.plan_decode(q, cache, seqlens, DV).num_parts
            try:
                fn, plan = tl_run(q, cache, table, seqlens, causal)
                t_tl = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001
                log("tl kernel failed:", repr(e)[:200])
                plan, t_tl = None, float("nan")
            entry = dict(L=L, s_q=s_q, b=b, h=h, causal=causal, plan_splits=default, tl_plan=repr(plan), tl_ms=t_tl,
                         tl_tflops=flop / t_tl / 1e9)
            for splits in sorted({default, 2 * default}):
                t = triton.testing.do_bench(lambda: hopper_run(q, cache, table, seqlens, causal, splits),
                                            warmup=25, rep=200, return_mode="median")
                entry[f"hopper_ms_s{splits}"] = t
                entry[f"hopper_tflops_s{splits}"] = flop / t / 1e9
            best = min((k for k in entry if k.startswith("hopper_ms")), key=lambda k: entry[k])
            entry["hopper_best"] = best
            rep_splits = int(best.split("_s")[-1])
            entry["hopper_best_ms_repeat"] = triton.testing.do_bench(  # same version again: the noise
                lambda: hopper_run(q, cache, table, seqlens, causal, rep_splits), warmup=25, rep=200,
                return_mode="median")
            entry["hopper_best_tflops"] = flop / entry[best] / 1e9
            # the same split count as the tl kernel's plan, for a like-for-like figure
            entry["hopper_plan_tflops"] = entry[f"hopper_tflops_s{default}"]
            table_rows.append(entry)
            log(json.dumps(entry))
            del q, cache, table, seqlens
            torch.cuda.empty_cache()
    results["bench"] = dict(matmul_tflops=mm, rows=table_rows)
    log("")
    log(f"matmul ceiling {mm:.0f} TFLOP/s (8192^3 bf16, do_bench median)")
    log("| L | s_q | default splits | tl TFLOP/s | tl % | hopper TFLOP/s (default splits) | % | best splits "
        "| best TFLOP/s | % | best ms, repeat ms |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for e in table_rows:
        log(f"| {e['L']} | {e['s_q']} | {e['plan_splits']} | {e['tl_tflops']:.0f} | {100 * e['tl_tflops'] / mm:.1f} | "
            f"{e['hopper_plan_tflops']:.0f} | {100 * e['hopper_plan_tflops'] / mm:.1f} | "
            f"{e['hopper_best'].split('_s')[-1]} | {e['hopper_best_tflops']:.0f} | "
            f"{100 * e['hopper_best_tflops'] / mm:.1f} | {e[e['hopper_best']]:.3f}, {e['hopper_best_ms_repeat']:.3f} |")


def resources(results):
    results["resources"] = {}
    for rows in (hd.BLOCK_M, 32, 16):  # the 8-warp kernel, the few-rows kernel's two tiles
        c = hd.compile_for_sm90(torch.bfloat16, causal=False, rows=rows)
        info = dict(shared=c.metadata.shared, num_warps=c.metadata.num_warps, triton=triton.__version__)
        try:
            c._init_handles()
            info.update(n_regs=c.n_regs, n_spills=c.n_spills)
        except Exception as e:  # noqa: BLE001
            info["init_error"] = repr(e)
        results["resources"][rows] = info
        log(f"resources, {rows} rows:", info)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    log(results)
    t0 = time.time()
    try:
        resources(results)
    except Exception as e:  # noqa: BLE001
        log("resources failed:", repr(e))
    ok = check(args, results)
    log(f"check done in {time.time() - t0:.0f} s")
    if not args.no_bench:
        bench(args, results)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "hopper_check.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    log(f"correctness: {'PASS' if ok else 'FAIL'}; total {time.time() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
