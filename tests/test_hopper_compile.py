"""The Gluon Hopper decode kernels (mla_verify.kernels.hopper_decode) compile for sm_90a without a GPU.

Runs on a CPU machine: Triton compiles for GPUTarget("cuda", 90, 32) with its own ptxas. What must hold,
for the 8-warp kernel (64 query rows) and the few-rows kernel's 16- and 32-row tiles: it compiles
(bf16 and fp16, causal and not, a small and a large batch); its shared memory fits one block's
232,448 bytes and holds Q and two K stages; its warps; the PTX has TMA bulk tensor copies and wgmma;
the SASS (read with the cuobjdump Triton's package carries, when present) has the HGMMA shapes the
tiles imply, and with Triton 3.6, the GPU machine's version, where the kernels were measured, no
stack frame and no local-memory spills. (Triton 3.9's build of the 8-warp kernel spills about 170
bytes of scalars: recorded, not failed.) The GPU check and timing are benchmarks/hopper_check.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import warnings

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon dialect")

from mla_verify.kernels import hopper_decode as hd  # noqa: E402

SMEM_LIMIT = 232448  # bytes one block may use on sm_90
# (dtype, causal, batch, query rows)
VARIANTS = [(torch.bfloat16, False, 128, 64), (torch.float16, True, 4096, 64), (torch.bfloat16, True, 128, 16),
            (torch.float16, False, 4096, 9), (torch.bfloat16, True, 128, 32)]
# per tile of rows: (warps, HGMMA shapes in the SASS, least shared memory: Q + two K stages + P)
EXPECTED = {64: (8, ("HGMMA.64x256x16.F32", "HGMMA.64x32x16.F32"), 224 * 1024),  # P·V, Q·Kᵀ halves
            16: (4, ("HGMMA.64x16x16.F32",), 16 * 576 * 2 + 2 * 64 * 576 * 2),  # Sᵀ and Oᵀ, N = 16 rows
            32: (8, ("HGMMA.64x32x16.F32", "HGMMA.64x16x16.F32"), 32 * 576 * 2 + 2 * 64 * 576 * 2)}


def _cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _tile(rows: int) -> int:
    return hd.BLOCK_M if rows > hd.FEW_ROWS else hd.few_rows_tile(rows)


@pytest.fixture(scope="module", params=VARIANTS,
                ids=lambda v: f"{str(v[0])[6:]}-causal{int(v[1])}-b{v[2]}-rows{v[3]}")
def compiled(request):
    dtype, causal, batch, rows = request.param
    return _tile(rows), hd.compile_for_sm90(dtype, causal=causal, batch=batch, rows=rows)


def test_compiles_within_shared_memory(compiled):
    tile, kernel = compiled
    warps, _, least = EXPECTED[tile]
    assert least <= kernel.metadata.shared <= SMEM_LIMIT, kernel.metadata.shared
    assert kernel.metadata.num_warps == warps


def test_ptx_uses_tma_and_wgmma(compiled):
    ptx = compiled[1].asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx  # TMA copies of the cache tiles
    assert "wgmma.mma_async" in ptx  # warpgroup MMA
    assert "mbarrier" in ptx


def test_sass_has_hgmma_and_no_spills(compiled):
    tile, kernel = compiled
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("Triton's package carries no cuobjdump here")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    for shape in EXPECTED[tile][1]:
        assert shape in sass, shape
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    if triton.__version__.startswith("3.6") or tile <= hd.FEW_ROWS:  # the few-rows kernels spill in neither
        assert stack == 0 and spills == 0, usage
    else:
        if stack or spills:
            warnings.warn(f"Triton {triton.__version__}: REG {regs}, STACK {stack}, {spills} LDL/STL (the "
                          "measured Triton 3.6 build has none)")
        assert stack <= 256, usage  # a guard against an accumulator spill (that would be 512+ bytes)
    assert regs <= 255


def test_supports_declines_what_it_cannot_run():
    q = torch.zeros(2, 1, 64, 576, dtype=torch.bfloat16)
    cache = torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)
    assert not hd.supports(q, cache, 512)  # CPU tensors
    assert not hd.supports(q.float(), cache.float(), 512)
    assert not hd.supports(q, cache, 512, is_fp8_kvcache=True)


def test_supports_declines_batches_past_its_sequence_search():
    # the kernel finds its sequence in one vector load of MAX_BATCH entries; larger batches use the tl kernel
    assert hd._batch_block(hd.MAX_BATCH) == hd.MAX_BATCH
    q = torch.zeros(hd.MAX_BATCH + 1, 1, 64, 576, dtype=torch.bfloat16)
    assert not hd.supports(q, torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16), 512)


def test_few_rows_take_the_smallest_tile_that_holds_them():
    assert [hd.few_rows_tile(rows) for rows in (1, 9, 16, 17, 32)] == [16, 16, 16, 32, 32]
    assert all(hd.few_rows_tile(rows) >= rows for rows in range(1, hd.FEW_ROWS + 1))
