"""The Triton decode kernels on the CPU, through Triton's interpreter: mla_verify.kernels.triton_decode
(fixed splits) and mla_verify.kernels.scheduled_decode (the same inner loop on a device-made schedule),
each case run through both.

Triton reads TRITON_INTERPRET when a kernel is defined, so whichever module imported triton or the
kernel first would decide the mode for the whole pytest process. The kernel cases therefore run in
one worker subprocess started with TRITON_INTERPRET=1 (this file, run as a script); the tests here
read its verdicts, one test per case. Each case is judged by the suite's own machinery
(mla_verify.decode.checks.check_case): poisoned allocator, NaN in every unused cache slot, int32-max ids in
unused block-table entries, canaries around q and the strided cache, input integrity, exact empty
rows (out 0, lse -inf) and out/lse within the case's derived float64-reference bound
(mla_verify.decode.bounds, the project's one tolerance model); then a second call must be
bit-identical (the kernel declares itself deterministic). FP8 caches (both layouts), sparse index
lists (invalid entries, duplicates, the pool's last slot, all invalid) and sinks have cases of their
own.

bfloat16 is not run here: a bf16 tl.dot in the interpreter returns garbage (~1e10 for unit-scale
inputs, an upstream interpreter bug), so those cases are skipped with that reason; bf16 is checked
on a GPU (benchmarks/bench_decode.py --check). Triton missing is a failure, not a skip: CI
installs it (`pip install -e .[triton]`).

Repro of one case: TRITON_INTERPRET=1 python tests/test_triton_kernel.py --case KERNEL:ID (KERNEL is
triton or scheduled)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mla_verify.decode.case import DecodeCase
from mla_verify.rounding import bitwise_equal

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 600
BF16_SKIP = ("bfloat16 tl.dot is broken in Triton's CPU interpreter (returns values ~1e10 for unit-scale "
             "inputs); bf16 is checked on a GPU by benchmarks/bench_decode.py --check")


@dataclass(frozen=True)
class KernelCase:
    """A decode case plus how to launch it: num_splits None = the kernel's own plan (the scheduled
    kernel: num_splits given = its work cut into SCHEDULED_PARTS parts with no minimum size, so every
    tile of these small cases is a piece of its own and the merge combines many); config
    'test' = the fixed small tile (block_m 16, block_n 16) for reproducibility, 'heuristic' = the
    kernel's shape heuristic (larger tiles). wave_sequences > 0: the scheduled kernel's plan may give
    each sequence a part of its own (the Hopper plan's whole-sequence schedule, here on the tl kernel)."""

    id: str
    case: DecodeCase
    num_splits: int | None = None
    config: str = "test"
    wave_sequences: float = 0.0


def _case(dtype: str = "float32", b: int = 1, s_q: int = 1, h: int = 1, widths: tuple[int, int] = (48, 32),
          page: int = 16, lengths: tuple[int, ...] = (17,), causal: bool = False, regime: str = "unit",
          scale: str = "inverse_sqrt_d", permuted: bool = True, strided: bool = False, seed: int = 0) -> DecodeCase:
    return DecodeCase(dtype=dtype, batch=b, s_q=s_q, heads=h, d=widths[0], head_dim_v=widths[1], page_size=page,
                      lengths=lengths, causal=causal, regime=regime, scale=scale, permute_pages=permuted,
                      strided_cache=strided, extra_blocks=2, seed=seed, layout_seed=seed + 1)


def _cases() -> list[KernelCase]:
    cases = []
    for dtype in ("float32", "float16", "bfloat16"):
        t = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
        cases += [
            # lengths 0, 1, page-1, page, page+1 in one varlen batch; plan's own split count
            KernelCase(f"{t}-edges-p16", _case(dtype, b=5, h=3, page=16, lengths=(0, 1, 15, 16, 17))),
            # causal s_q = 3 over the same edges: early queries of short rows see nothing
            KernelCase(f"{t}-edges-causal-sq3", _case(dtype, b=5, s_q=3, h=3, page=16, lengths=(0, 1, 15, 16, 17),
                                                      causal=True), num_splits=2),
            # page 32, one head, causal s_q = 2, strided cache view
            KernelCase(f"{t}-p32-h1-causal-strided", _case(dtype, b=3, s_q=2, h=1, widths=(80, 64), page=32,
                                                          lengths=(31, 32, 33), causal=True, strided=True)),
            # 16 heads (one full group), more splits than tiles in the short row: empty splits merge
            KernelCase(f"{t}-h16-empty-splits", _case(dtype, b=2, h=16, widths=(80, 64), lengths=(40, 3)),
                       num_splits=4),
            # 17 heads: a second, nearly empty row group; causal s_q = 2 folded into rows
            KernelCase(f"{t}-h17-causal-sq2", _case(dtype, b=2, s_q=2, h=17, lengths=(33, 16), causal=True),
                       num_splits=3),
            # every row empty: out 0, lse -inf, with and without splits
            KernelCase(f"{t}-all-empty", _case(dtype, b=2, h=3, lengths=(0, 0))),
            KernelCase(f"{t}-all-empty-splits", _case(dtype, b=2, h=3, lengths=(0, 0)), num_splits=3),
        ]
    cases += [
        # the kernel's own tile heuristic (block_m 16..64, block_n 16..64)
        KernelCase("fp32-heuristic-h9-varlen", _case("float32", b=4, s_q=2, h=9, lengths=(5, 50, 0, 33), causal=True,
                                                     strided=True), config="heuristic"),
        KernelCase("fp16-heuristic-h40-sq2", _case("float16", b=2, s_q=2, h=40, widths=(80, 64),
                                                   lengths=(70, 129)), config="heuristic", num_splits=2),
        # odd widths (padded to powers of two with masks), latent-only rows (d = head_dim_v)
        KernelCase("fp32-widths-40-32", _case("float32", b=2, h=3, widths=(40, 32), lengths=(20, 9))),
        KernelCase("fp32-widths-24-8", _case("float32", b=2, h=3, widths=(24, 8), lengths=(20, 9))),
        KernelCase("fp16-widths-37-21", _case("float16", b=2, s_q=2, h=3, widths=(37, 21), lengths=(20, 9),
                                              causal=True, strided=True)),
        KernelCase("fp32-widths-32-32", _case("float32", b=2, h=2, widths=(32, 32), lengths=(20, 9))),
        # pages that are not powers of two, and page 1
        KernelCase("fp32-page7", _case("float32", b=2, h=3, page=7, lengths=(20, 6)), num_splits=2),
        KernelCase("fp16-page1", _case("float16", b=2, h=3, page=1, lengths=(5, 1), causal=True, s_q=2)),
        # value regimes of the suite: extreme logits (±300), large values, tiny values, constant keys
        KernelCase("fp32-extreme-positive", _case("float32", b=2, h=3, lengths=(40, 17), regime="extreme_positive",
                                                  scale="deepseek_v3"), num_splits=2),
        KernelCase("fp32-extreme-negative", _case("float32", b=2, h=3, lengths=(40, 17),
                                                  regime="extreme_negative"), num_splits=2),
        KernelCase("fp16-large", _case("float16", b=2, h=3, lengths=(40, 17), regime="large"), num_splits=2),
        KernelCase("fp16-tiny", _case("float16", b=2, h=3, lengths=(40, 17), regime="tiny", scale="one")),
        KernelCase("fp16-constant-keys", _case("float16", b=2, h=3, lengths=(40, 17), regime="constant_keys")),
        # s_q = 8 (the declared maximum), causal
        KernelCase("fp16-sq8-causal", _case("float16", b=2, s_q=8, h=2, lengths=(12, 5), causal=True)),
        # the whole-sequence schedule: sequences' units padded to the longest, empty and one-key rows among them
        KernelCase("fp32-whole-sequences", _case("float32", b=4, s_q=2, h=3, lengths=(0, 1, 17, 33), causal=True),
                   wave_sequences=3.0),
    ]
    # FP8 caches (dequantised in the kernel to q's dtype), sparse index lists, sinks
    fp8 = dict(widths=(48, 32), page=4, lengths=(5, 19), strided=True)
    cases += [
        KernelCase("fp32-fp8-ds-mla-causal", _fp8(_case("float32", b=2, s_q=2, h=3, causal=True, **fp8), "fp8_ds_mla"),
                   num_splits=3),
        KernelCase("fp16-fp8-ds-mla-two-groups", _fp8(_case("float16", b=2, h=17, widths=(288, 256), lengths=(9, 3)),
                                                      "fp8_ds_mla", sink="finite")),
        KernelCase("fp16-fp8-e4m3-sink", _fp8(_case("float16", b=2, s_q=2, h=3, causal=True, **fp8), "fp8_e4m3",
                                              sink="infinite"), num_splits=2),
        KernelCase("fp32-sparse-invalid-splits", _fp8(_case("float32", b=2, s_q=2, h=3, causal=True, **fp8), "native",
                                                      topk=21, pattern="with_invalid"), num_splits=3),
        KernelCase("fp16-sparse-fp8-duplicates", _fp8(_case("float16", b=2, s_q=3, h=17, causal=True, **fp8),
                                                      "fp8_ds_mla", topk=18, pattern="duplicates", sink="finite"),
                   num_splits=2),
        KernelCase("fp16-sparse-e4m3-last-slot", _fp8(_case("float16", b=2, h=3, **fp8), "fp8_e4m3", topk=7,
                                                      pattern="last_slot")),
        KernelCase("fp32-sparse-all-invalid", _fp8(_case("float32", b=2, h=3, **fp8), "native", topk=5,
                                                   pattern="all_invalid"), num_splits=2),
    ]
    return cases


def _fp8(case: DecodeCase, kv_format: str, topk: int = 0, pattern: str = "subset", sink: str = "none") -> DecodeCase:
    return case.replace(kv_format=kv_format, topk=topk, index_pattern=pattern, attn_sink=sink)


CASES = {kc.id: kc for kc in _cases()}
KERNELS = ("triton", "scheduled")
SCHEDULED_PARTS = 64


# ----------------------------------------------------------------------------------------------
# Worker: runs in a subprocess with TRITON_INTERPRET=1
# ----------------------------------------------------------------------------------------------

def _judge(kc: KernelCase, kernel: str = "triton") -> dict:
    """Run one case through the interpreter; returns {"ok", "message", "sound", "sharp", "seconds"}."""
    import dataclasses
    import functools

    from mla_verify.decode.inputs import build_inputs
    from mla_verify.decode.checks import CaseFailure, Implementation, call_kernel, compare, expected_for
    from mla_verify.kernels import scheduled_decode as sd
    from mla_verify.kernels import triton_decode as td

    config = td.DecodeConfig(block_m=16, block_n=16, num_warps=4, num_stages=1) if kc.config == "test" else None
    if kernel == "triton":
        fn = functools.partial(td.paged_decode, num_splits=kc.num_splits, config=config)
    elif kc.wave_sequences:
        def fn(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal=False):
            plan = dataclasses.replace(sd.plan_decode(q, kv_cache, cache_seqlens, head_dim_v, config=config),
                                       wave_sequences=kc.wave_sequences)
            return sd.launch_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, plan)
    else:
        fn = functools.partial(sd.paged_decode, num_parts=SCHEDULED_PARTS if kc.num_splits else None, config=config)
    impl = Implementation(name=kernel, spec=f"mla_verify.kernels.{kernel}_decode", fn=fn,
                          capabilities=td.CAPABILITIES.replace(devices=("cpu",)))
    started = time.perf_counter()
    try:
        inputs = build_inputs(kc.case)
        first = call_kernel(impl, inputs)
        ratios = compare(first, expected_for(inputs, impl.capabilities), impl.capabilities, kc.case)
        second = call_kernel(impl, inputs)
        same = (bitwise_equal(first.out, second.out, nan_payload=True)
                and bitwise_equal(first.lse, second.lse, nan_payload=True))
        if not same:
            return {"ok": False, "message": "two calls on the same inputs differ (declared deterministic)",
                    "seconds": time.perf_counter() - started}
    except CaseFailure as failure:
        return {"ok": False, "message": str(failure), "seconds": time.perf_counter() - started}
    except Exception as error:  # noqa: BLE001 - report anything the worker hits as the case's failure
        return {"ok": False, "message": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
    return {"ok": True, "message": "", "sound": ratios.sound, "sharp": ratios.sharp,
            "seconds": time.perf_counter() - started}


def _worker(ids: list[str]) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    from mla_verify.kernels import triton_decode as td

    if not td.interpreting():
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; run this file as a script")
    if ids == ["schedules"]:
        return _schedules()
    return {key: _judge(CASES[key.split(":", 1)[1]], key.split(":", 1)[0]) for key in ids}


def _run_worker(ids: list[str], timeout: float = WORKER_TIMEOUT_S) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, __file__, "--json", *ids], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"interpreter worker failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_triton_is_importable():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        pytest.fail(f"triton is not importable ({error}); CI installs it: pip install -e '.[triton]'")


RUNNABLE = [f"{kernel}:{case_id}" for kernel in KERNELS for case_id, kc in CASES.items()
            if kc.case.dtype != "bfloat16"]


@pytest.fixture(scope="module")
def verdicts() -> dict:
    return _run_worker(RUNNABLE)


@pytest.mark.parametrize("key", [
    pytest.param(f"{kernel}:{case_id}", marks=pytest.mark.skip(reason=BF16_SKIP)) if kc.case.dtype == "bfloat16"
    else f"{kernel}:{case_id}" for kernel in KERNELS for case_id, kc in CASES.items()])
def test_interpreted_kernel_matches_reference(verdicts, key):
    verdict = verdicts[key]
    kc = CASES[key.split(":", 1)[1]]
    assert verdict["ok"], (f"{verdict['message']}\n  case: {kc.case.describe()} num_splits={kc.num_splits} "
                           f"config={kc.config}\n  repro: TRITON_INTERPRET=1 python tests/test_triton_kernel.py "
                           f"--case {key}")


def test_declared_capabilities():
    from mla_verify.decode.contract import capabilities_of
    from mla_verify.kernels.triton_decode import triton_paged_decode

    caps = capabilities_of(triton_paged_decode)
    assert set(caps.dtypes) == {torch.bfloat16, torch.float16, torch.float32}
    assert caps.devices == ("cuda",)
    assert caps.max_heads == 128 and caps.max_s_q == 8 and caps.causal
    assert caps.deterministic and caps.strided_cache and caps.lse_base == "e" and caps.empty_row_lse == -math.inf
    assert caps.page_sizes is None and caps.head_dims is None
    assert set(caps.kv_formats) == set(caps.sparse_kv_formats) == {"native", "fp8_ds_mla", "fp8_e4m3"}
    assert caps.attn_sink and caps.dequant_dtype is None  # FP8 values rounded to q's dtype for the dots
    # every page size and width the cases above exercise is inside the declaration
    assert all(caps.supports_page(kc.case.page_size) for kc in CASES.values())
    # the scheduled kernel runs the same inner loop: it declares the same
    from mla_verify.kernels.scheduled_decode import scheduled_paged_decode
    assert capabilities_of(scheduled_paged_decode) == caps


def test_split_plan_follows_batch_and_length():
    from mla_verify.kernels.triton_decode import INTERPRETER_SM_COUNT, MIN_SPLIT_TOKENS, plan_decode

    def plan(b: int, h: int, length: int):
        q = torch.empty(b, 1, h, 576, dtype=torch.bfloat16)
        return plan_decode(q, torch.empty(1, 64, 1, 576, dtype=torch.bfloat16),
                           torch.full((b,), length, dtype=torch.int32), 512)

    one = plan(1, 16, 16384)  # CPU tensors: the interpreter's assumed multiprocessor count
    assert one.num_splits == one.config.waves * one.config.resident_per_sm * INTERPRETER_SM_COUNT
    assert plan(1, 16, 100).num_splits == 1  # below MIN_SPLIT_TOKENS: one split
    assert plan(1, 16, 3 * MIN_SPLIT_TOKENS).num_splits == 3
    assert plan(128, 128, 16384).num_splits == 1
    assert plan(2, 16, 0).num_splits == 1


def test_scheduled_plan_reads_no_tensor():
    from mla_verify.kernels.scheduled_decode import WAVES, plan_decode
    from mla_verify.kernels.triton_decode import INTERPRETER_SM_COUNT

    def plan(b: int, h: int, s_q: int = 1):
        q = torch.empty(b, s_q, h, 576, dtype=torch.bfloat16)
        lengths = torch.empty(b, dtype=torch.int32, device="meta")  # a tensor no host code can read
        return plan_decode(q, torch.empty(1, 64, 1, 576, dtype=torch.bfloat16), lengths, 512)

    one = plan(1, 16)  # CPU tensors: the interpreter's assumed multiprocessor count
    assert one.num_parts == WAVES * one.config.resident_per_sm * INTERPRETER_SM_COUNT
    wide = plan(128, 128, s_q=2)  # 256 rows: four 64-row groups share the wave
    assert wide.num_parts == max(1, WAVES * wide.config.resident_per_sm * INTERPRETER_SM_COUNT // 4)


def test_hopper_plan_cuts_one_wave_and_offers_whole_sequences(monkeypatch):
    """The Hopper kernel's plan (its shapes eligible; CPU tensors stand in): one wave of parts (its
    programs walk their parts' pieces), and the sequences one wave of whole-sequence programs holds,
    from which the device schedule picks whole sequences when the lengths fill it
    (test_device_schedule_...; the H200 runs behind it: benchmarks/triton_decode_results.md)."""
    from mla_verify.kernels import scheduled_decode as sd

    monkeypatch.setattr(sd, "_hopper_supports", lambda *args: True)
    monkeypatch.setattr(sd, "_sm_count", lambda device: 132)

    def plan(b: int, h: int, s_q: int = 1):
        q = torch.empty(b, s_q, h, 576, dtype=torch.bfloat16)
        return sd.plan_decode(q, torch.empty(1, 64, 1, 576, dtype=torch.bfloat16), torch.empty(b), 512)

    assert plan(128, 128).hopper and plan(128, 128).num_parts == 66  # two row groups share the wave
    assert plan(128, 128).wave_sequences == 66 and plan(128, 128, s_q=2).wave_sequences == 33
    # few rows (one program per sequence or part on the few-rows kernel) and 64 rows: one wave
    assert plan(128, 16).num_parts == 132 and plan(128, 16).wave_sequences == 132
    assert plan(1, 16).num_parts == 132 and plan(64, 1, s_q=2).num_parts == 132
    assert plan(1, 64).num_parts == 132
    # cut plans keep pieces of at least MIN_SPLIT_TOKENS keys (plus a piece's fixed cost)
    assert plan(16, 128).min_part_units == sd._overhead_units(sd.HOPPER_CONFIG) + sd.MIN_SPLIT_TOKENS // 64
    # the tl kernel's plan never takes whole sequences: its merge writes every result anyway
    monkeypatch.setattr(sd, "_hopper_supports", lambda *args: False)
    assert plan(128, 128).wave_sequences == 0


# (lengths, num_parts, min_part_units or None for the plan's own, wave_sequences) → what the schedule
# must satisfy; wave_sequences > 0 lets the device give each sequence a part of its own
SCHEDULES = {
    "one-long": ((16384,), 8, None, 0),
    "short-one-split": ((100,), 8, None, 0),
    "varlen": ((4096, 2048, 3000, 17, 0, 1, 8191), 8, None, 0),
    "many-short": (tuple(range(0, 300, 7)), 8, None, 0),
    "per-tile": ((40, 3, 0, 33), 64, 1, 0),
    "all-empty": ((0, 0, 0), 5, 1, 0),
    "batch-over-block": (tuple((i * 37) % 500 for i in range(1500)), 6, None, 0),
    # whole unless whole sequences on waves of `capacity` programs take longer than one wave of parts
    # (spread = total / capacity units) plus the price of cutting (CUT_COST_TOKENS = 1280 keys, 40
    # units of 32 keys, per sequence per program): equal sequences filling their waves, short ones,
    # close ones are whole; long ones leaving half a wave idle, spread ones, one long among short ones
    # are cut
    "whole-equal": ((4096,) * 8, 8, None, 8.0),
    "whole-two-waves": ((16384,) * 16, 8, None, 8.0),
    "whole-short-half-a-wave": ((100,) * 4, 8, None, 8.0),
    "cut-half-a-wave": ((16384,) * 4, 8, None, 8.0),
    "cut-under-half-a-wave": ((16384,) * 3, 8, None, 8.0),
    "cut-second-wave-half-full": ((16384,) * 12, 8, None, 8.0),
    "whole-varlen": ((4096, 4000, 3800, 3900), 8, None, 4.0),
    "whole-short-varlen-over-waves": (tuple(100 + (i * 37) % 500 for i in range(40)), 8, None, 8.0),
    "cut-spread-varlen": ((16384, 8192, 12000, 10000), 8, None, 4.0),
    # memory-bound (the few-rows kernel's plan): idle programs' bandwidth goes to the busy ones, so a
    # spread the compute-bound rule cuts stays whole; one sequence alone is still cut
    "cut-compute-bound-spread": ((4096, 2048, 2048, 2048), 8, None, 4.0),
    "whole-memory-bound-spread": ((4096, 2048, 2048, 2048), 8, None, 4.0, True),
    "cut-memory-bound-alone": ((16384,), 8, None, 8.0, True),
    "cut-one-long": ((16384, 100, 100, 100), 8, None, 4.0),
    "whole-with-empty": ((0,) + (300,) * 8, 9, None, 9.0),
    "whole-over-block": ((300,) * 1500, 6, None, 1500.0),
}


def _schedules() -> dict:
    """Worker side: the device schedule of each SCHEDULES entry (bf16 16-row config, block_n 32)."""
    import dataclasses

    from mla_verify.kernels import scheduled_decode as sd
    from mla_verify.kernels import triton_decode as td

    config = td.decode_config(torch.bfloat16, 16, 576, 512)
    found = {}
    for name, (lengths, parts, min_units, capacity, *memory_bound) in SCHEDULES.items():
        plan = sd.DecodePlan(config=config, num_parts=parts,
                             min_part_units=min_units or sd.plan_decode(
                                 torch.empty(1, 1, 16, 576, dtype=torch.bfloat16), torch.empty(0),
                                 torch.empty(0), 512).min_part_units, wave_sequences=capacity)
        if memory_bound:
            plan = dataclasses.replace(plan, tail_share=sd.MEMORY_BOUND_TAIL_SHARE, lone_speedup=sd.LONE_SPEEDUP)
        start, splits, slot, first_part, totals = sd.schedule_decode(
            torch.tensor(lengths, dtype=torch.int32), len(lengths), plan)
        found[name] = {"start": start.tolist(), "splits": splits.tolist(), "slot": slot.tolist(),
                       "first_part": first_part.tolist(), "totals": totals.tolist(), "block_n": config.block_n,
                       "overhead": sd._overhead_units(config), "min_part_units": plan.min_part_units,
                       "cut_cost_units": sd.CUT_COST_TOKENS / config.block_n, "tail_share": plan.tail_share,
                       "lone_speedup": plan.lone_speedup}
    return found


@pytest.fixture(scope="module")
def schedules() -> dict:
    return _run_worker(["schedules"])


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_device_schedule_covers_every_tile_once_and_balances(schedules, name):
    lengths, parts, _, capacity, *_ = SCHEDULES[name]
    got = schedules[name]
    per_part, total, pieces = got["totals"]
    block_n, overhead = got["block_n"], got["overhead"]
    units = [overhead + -(-n // block_n) for n in lengths]
    whole = False
    if capacity:  # the cost model of the module's CUT_COST_TOKENS and _schedule_kernel
        per_program, spread, longest = len(lengths) / capacity, sum(units) / capacity, max(units)
        alike = min(units) / longest
        tail = (math.ceil(per_program) - per_program) * alike + 0.5 * (1 - alike)
        greedy = max(longest, spread + tail * longest)
        whole_time = max(spread + got["tail_share"] * (greedy - spread), longest / got["lone_speedup"])
        whole = whole_time <= spread + got["cut_cost_units"] * per_program
    assert whole == name.startswith("whole"), "the test's name says which way the device must decide"
    if whole:  # a part per sequence, each as long as the longest sequence's cost
        assert per_part == max(units) and total == len(lengths) * max(units)
        assert got["start"] == [i * max(units) for i in range(len(lengths))]
        assert got["splits"] == [1] * len(lengths) and got["first_part"] == list(range(len(lengths)))
        assert got["slot"] == list(range(len(lengths))) and pieces == len(lengths)
        return
    assert total == sum(units)
    assert per_part == max(-(-total // parts), got["min_part_units"])
    assert got["start"] == [sum(units[:i]) for i in range(len(lengths))]
    slots = 0
    for i, n in enumerate(lengths):
        tiles = -(-n // block_n)
        first_tile = got["start"][i] + overhead
        # the parts holding the sequence's tiles, in order; one part for a sequence with no key
        holders = sorted({(first_tile + t) // per_part for t in range(tiles)}) or [got["start"][i] // per_part]
        assert got["first_part"][i] == holders[0] and got["splits"][i] == len(holders), (i, n)
        assert holders == list(range(holders[0], holders[0] + len(holders)))
        assert all(p < parts for p in holders), "a piece assigned to a part that is not launched"
        assert got["slot"][i] == slots
        slots += len(holders)
    assert pieces == slots <= len(lengths) + parts  # the grid's and the partial buffer's size
    # balance: every launched part but the last holds per_part units, none more
    assert -(-total // per_part) <= parts


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_part_walks_visit_every_piece_once_in_key_order(schedules, name):
    """The Hopper kernels run one program per part, walking the part's sequences (hopper_decode's
    `_part_sequences`: those whose parts first_part .. first_part + splits - 1 include it, counted in
    one vector; `_piece_range`: the piece's slot and key range), over a grid of max(b, num_parts)
    parts. The same arithmetic here, on the device's schedule: every piece is visited by exactly one
    program, the key ranges of a sequence's pieces tile [0, length) in slot order, and no program
    past the grid has work."""
    lengths, parts, *_ = SCHEDULES[name]
    got = schedules[name]
    per_part, total, pieces = got["totals"]
    block_n, overhead = got["block_n"], got["overhead"]
    first_part, splits = got["first_part"], got["splits"]
    last_part = [f + n - 1 for f, n in zip(first_part, splits)]
    grid = max(len(lengths), parts)
    visits = {}
    for part in range(grid + 4):
        first = sum(last < part for last in last_part)
        count = max(sum(f <= part for f in first_part) - first, 0)
        if part >= grid:
            assert count == 0, f"part {part} past the grid has {count} sequences"
        for seq in range(first, first + count):
            assert first_part[seq] <= part <= last_part[seq]
            piece = got["slot"][seq] + part - first_part[seq]
            unit_lo, unit_hi = part * per_part, min(part * per_part + per_part, total)
            first_tile = got["start"][seq] + overhead
            start = max(unit_lo - first_tile, 0) * block_n
            end = min(min(unit_hi - first_tile, -(-lengths[seq] // block_n)) * block_n, lengths[seq])
            assert piece not in visits, f"piece {piece} visited twice"
            visits[piece] = (seq, max(start, 0), max(end, start))
    assert sorted(visits) == list(range(pieces))
    for seq, n in enumerate(lengths):
        ranges = [visits[k][1:] for k in sorted(visits) if visits[k][0] == seq]
        covered = [r for r in ranges if r[1] > r[0]]
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), (seq, ranges)
        assert (covered[0][0], covered[-1][1]) == (0, n) if n else not covered, (seq, ranges)


def test_one_long_sequence_spreads_over_every_part(schedules):
    assert schedules["one-long"]["splits"] == [8]
    assert schedules["short-one-split"]["splits"] == [1]  # 100 keys: below the minimum part


def test_bad_inputs_are_rejected_before_launch():
    from mla_verify.kernels.triton_decode import interpreting, triton_paged_decode

    good = dict(q=torch.randn(2, 1, 3, 8), kv_cache=torch.randn(4, 4, 1, 8),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                cache_seqlens=torch.tensor([3, 8], dtype=torch.int32), head_dim_v=6, softmax_scale=0.3)
    with pytest.raises(ValueError, match="head_dim_v must be an int"):
        triton_paged_decode(**{**good, "head_dim_v": 9})
    with pytest.raises(ValueError, match="block_table must be int32"):
        triton_paged_decode(**{**good, "block_table": good["block_table"].long()})
    with pytest.raises(TypeError, match="q must be bfloat16, float16 or float32"):
        triton_paged_decode(**{**good, "q": good["q"].double(), "kv_cache": good["kv_cache"].double()})
    wide = dict(q=torch.randn(2, 1, 3, 1100), kv_cache=torch.randn(4, 4, 1, 1100))
    with pytest.raises(ValueError, match="head_dim_v must be <= 1024"):
        triton_paged_decode(**{**good, **wide, "head_dim_v": 1050})
    if not interpreting():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            triton_paged_decode(**good)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the Triton decode kernel's interpreter cases.")
    parser.add_argument("--case", action="append", default=[], help="case id (repeatable; default: all runnable)")
    parser.add_argument("--json", nargs="*", help="worker mode: print the verdicts of these ids as JSON")
    args = parser.parse_args()
    if args.json is not None:
        print(json.dumps(_worker(args.json or RUNNABLE)))
        return
    for case_id, verdict in _worker(args.case or RUNNABLE).items():
        status = "ok  " if verdict["ok"] else "FAIL"
        ratios = (f"error/bound {verdict['sound']:.3g} (sound) {verdict['sharp']:.3g} (sharp)" if verdict["ok"]
                  else verdict["message"])
        print(f"{status} {case_id:32s} {verdict['seconds']:6.2f}s  {ratios}")


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    main()


def test_a_tile_this_gpu_refuses_falls_back_to_a_smaller_one():
    """launch_fitting: where a GPU has less shared memory than the H200 the configs were sized for
    (Triton raises OutOfResources before launching), the same rows and warps with fewer stages or
    shorter key tiles, largest first; a clear error when none fits."""
    from triton.runtime.errors import OutOfResources

    from mla_verify.kernels.triton_decode import DecodeConfig, launch_fitting, smaller_configs

    config = DecodeConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    assert [(c.block_n, c.num_stages) for c in smaller_configs(config)] == [(16, 2), (32, 1), (16, 1)]
    assert [(c.block_n, c.num_stages) for c in smaller_configs(config, retile=False)] == [(32, 1)]
    assert all(c.block_m == 64 and c.num_warps == 8 for c in smaller_configs(config))

    class Kernel:  # accepts tiles of at most `limit` keys × stages, as shared memory would
        def __init__(self, limit: int) -> None:
            self.limit, self.launched = limit, []

        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, num_stages, **constexprs):
                if BLOCK_N * num_stages > self.limit:
                    raise OutOfResources(BLOCK_N * num_stages * 1024, self.limit * 1024, "shared memory")
                self.launched.append((grid, args, BLOCK_N, num_stages, constexprs["HEAD_DIM"]))
            return launch

    fits = Kernel(limit=64)
    assert launch_fitting(fits, (1, 2), ("q",), {"HEAD_DIM": 576}, config) == config
    small = Kernel(limit=16)
    chosen = launch_fitting(small, (1, 2), ("q",), {"HEAD_DIM": 576}, config)
    assert (chosen.block_n, chosen.num_stages) == (16, 1) and small.launched == [((1, 2), ("q",), 16, 1, 576)]
    with pytest.raises(RuntimeError, match="no tile of 64 rows fits this GPU's shared memory"):
        launch_fitting(Kernel(limit=8), (1,), (), {"HEAD_DIM": 576}, config)
