"""The kernel adapters' translations, checked on CPU against the float64 reference without the
libraries (and without fakes of them): page indices and token slots built from permuted block
tables and varlen lengths, views of q and the cache, lse base and layout conversions, the
split-KV lse merge, argument binding across library versions, the adapter table, and
MissingDependency when a library is absent."""

import importlib.util
import math

import pytest
import torch

from mla_verify.adapters import (DECODE_ADAPTERS, LAYER_ADAPTERS, adapter_named, bind_by_name, expand_query_rows,
                                 load_module, merge_split_lse, missing_dependency, split_is_nonempty)
from mla_verify.adapters import flashinfer as fi
from mla_verify.adapters import flashmla as fm
from mla_verify.adapters import sglang as sg
from mla_verify.adapters import vllm as vl
from mla_verify.adapters import MissingDependency
from mla_verify.certify.registry import ImplementationError, resolve
from mla_verify.decode.bounds import RoundingModel, decode_bounds
from mla_verify.decode.case import DecodeCase
from mla_verify.decode.contract import capabilities_of, check_signature
from mla_verify.decode.inputs import OUT_OF_RANGE_BLOCK, build_inputs
from mla_verify.reference import paged_decode_reference, paged_decode_terms
from mla_verify.rounding import gamma, unit_roundoff

F64 = torch.float64


def _adapter_function(adapter):
    """The adapter's function, imported directly (resolve() refuses an adapter whose library is absent)."""
    module, _, attr = adapter.target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _case(**fields) -> DecodeCase:
    base = dict(dtype="float64", batch=4, s_q=3, heads=2, d=12, head_dim_v=8, page_size=4, lengths=(9, 0, 4, 13),
                causal=False, regime="unit", scale="inverse_sqrt_d", permute_pages=True, strided_cache=True,
                extra_blocks=3, seed=7, layout_seed=11)
    return DecodeCase(**{**base, **fields})


def _reference_rows(inputs, row: int) -> torch.Tensor:
    """The first L_row cache rows of sequence `row`, gathered by the reference (float64)."""
    terms = paged_decode_terms(*inputs.arguments)
    return terms.rows[row, :inputs.case.lengths[row]]


# ----------------------------------------------------------------------------------------------
# The table and the missing-library path
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DECODE_ADAPTERS))
def test_every_decode_adapter_resolves_on_a_machine_without_its_library(name):
    adapter = DECODE_ADAPTERS[name]
    fn = _adapter_function(adapter)  # imports; the library is loaded on the first call
    assert check_signature(fn) is None
    assert capabilities_of(fn).devices == ("cuda",)
    assert adapter.entry_point() == f'{name} = "{adapter.target}"'


@pytest.mark.parametrize("name", sorted(DECODE_ADAPTERS))
def test_a_missing_library_raises_one_line_missing_dependency_naming_the_package(name):
    adapter = DECODE_ADAPTERS[name]
    if importlib.util.find_spec(adapter.library) is not None:
        pytest.skip(f"{adapter.library} is installed here")
    with pytest.raises(ImplementationError, match=f"pip install {adapter.package}"):
        resolve(name)  # the CLI says so before any case runs
    fn = _adapter_function(adapter)
    inputs = build_inputs(_case(dtype="bfloat16", d=576, head_dim_v=512, page_size=64, heads=1, lengths=(3,),
                                batch=1, s_q=1))
    with pytest.raises(MissingDependency) as raised:
        fn(*inputs.arguments)
    message = str(raised.value)
    assert f"pip install {adapter.package}" in message and "\n" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert isinstance(missing_dependency(name), MissingDependency)


def test_load_module_tells_a_missing_package_from_a_broken_or_older_one():
    with pytest.raises(MissingDependency, match="no_such_library_xyz is not installed: pip install xyz"):
        load_module("no_such_library_xyz.ops", "no_such_library_xyz", "pip install xyz")
    with pytest.raises(ModuleNotFoundError):  # the package is there, the submodule is not: not "missing"
        load_module("torch.no_such_submodule_xyz", "torch", "pip install torch")


def test_adapters_validate_the_contract_before_loading_their_library():
    inputs = build_inputs(_case())
    q, kv_cache, block_table, cache_seqlens, head_dim_v, scale = inputs.arguments
    for adapter in DECODE_ADAPTERS.values():
        fn = _adapter_function(adapter)
        with pytest.raises(ValueError, match="block_table"):
            fn(q, kv_cache, block_table.to(torch.int64), cache_seqlens, head_dim_v, scale)


def test_layer_adapters_are_listed_and_unknown_names_are_refused():
    assert {a.library for a in LAYER_ADAPTERS.values()} == {"transformers"}
    with pytest.raises(ValueError, match="name must be one of"):
        adapter_named("flashmla-typo")


def test_declared_capabilities_are_the_libraries_real_ones():
    flashmla = capabilities_of(fm.flashmla_decode)
    assert flashmla.page_sizes == (64,) and flashmla.head_dims == ((576, 512),)
    assert flashmla.empty_row_lse == math.inf and set(flashmla.dtypes) == {torch.bfloat16, torch.float16}
    flashinfer = capabilities_of(fi.flashinfer_decode)
    assert flashinfer.page_sizes is None and flashinfer.empty_row_lse == -math.inf and flashinfer.lse_base == "e"
    for fn in (vl.vllm_triton_decode, sg.sglang_triton_decode):
        caps = capabilities_of(fn)
        assert all(dv >= 16 for _, dv in caps.head_dims)  # tl.dot needs N >= 16
        assert torch.float32 not in caps.dtypes  # fp32 would run through TF32 dots


# ----------------------------------------------------------------------------------------------
# FlashMLA
# ----------------------------------------------------------------------------------------------

def test_flashmla_metadata_arguments_count_query_rows_per_kv_head():
    lengths = torch.tensor([5, 0, 64], dtype=torch.int32)
    seqlens, rows, h_kv = fm.metadata_arguments(lengths, s_q=2, h_q=128, h_kv=1)
    assert seqlens is lengths and rows == 256 and h_kv == 1
    with pytest.raises(ValueError, match="multiple of h_kv"):
        fm.metadata_arguments(lengths, 1, 3, 2)


# ----------------------------------------------------------------------------------------------
# FlashInfer
# ----------------------------------------------------------------------------------------------

def test_flashinfer_indices_pick_exactly_each_sequences_pages_from_a_permuted_table():
    case = _case()
    inputs = build_inputs(case)
    page = case.page_size
    qo_indptr, kv_indptr, kv_indices, kv_len = fi.paged_kv_indices(inputs.block_table, inputs.cache_seqlens, page,
                                                                   case.s_q)
    assert qo_indptr.tolist() == [0, 3, 6, 9, 12] and kv_len.tolist() == list(case.lengths)
    assert kv_indptr.tolist() == [0, 3, 3, 4, 8]  # ceil(L / 4) pages: 3, 0, 1, 4
    assert all(i.dtype == torch.int32 for i in (qo_indptr, kv_indptr, kv_indices, kv_len))
    assert OUT_OF_RANGE_BLOCK not in kv_indices.tolist()
    ckv, kpe = fi.split_latent_cache(inputs.kv_cache, case.head_dim_v)
    for row, length in enumerate(case.lengths):
        pages = kv_indices[kv_indptr[row]:kv_indptr[row + 1]].long()
        gathered = torch.cat((ckv[pages], kpe[pages]), dim=-1).reshape(-1, case.d)[:length].to(F64)
        assert torch.equal(gathered, _reference_rows(inputs, row))


def test_flashinfer_indices_are_never_empty():
    _, kv_indptr, kv_indices, _ = fi.paged_kv_indices(torch.full((2, 1), OUT_OF_RANGE_BLOCK, dtype=torch.int32),
                                                      torch.zeros(2, dtype=torch.int32), 16, 1)
    assert kv_indptr.tolist() == [0, 0, 0] and kv_indices.tolist() == [0]


def test_flashinfer_query_and_cache_halves_are_views_without_copies():
    inputs = build_inputs(_case(strided_cache=True))
    q, kv_cache = inputs.q, inputs.kv_cache
    q_nope, q_pe = fi.split_queries(q, 8)
    ckv, kpe = fi.split_latent_cache(kv_cache, 8)
    assert q_nope.shape == (12, 2, 8) and q_pe.shape == (12, 2, 4)
    assert ckv.shape == (kv_cache.shape[0], 4, 8) and kpe.shape == (kv_cache.shape[0], 4, 4)
    for view, base in ((q_nope, q), (q_pe, q), (ckv, kv_cache), (kpe, kv_cache)):
        assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert torch.equal(torch.cat((q_nope, q_pe), -1), q.flatten(0, 1))
    assert ckv.stride(1) == kv_cache.stride(1)  # strided cache rows: the wide buffer's row stride


def test_base2_lse_converted_is_the_natural_lse_of_the_reference():
    inputs = build_inputs(_case(causal=True))
    out, lse = paged_decode_reference(*inputs.arguments, causal=True)  # natural log, -inf for empty rows
    lse2 = (lse / math.log(2)).to(torch.float32)  # what FlashInfer returns by default
    natural = fi.lse_base2_to_natural(lse2)
    assert natural.dtype == torch.float32
    finite = torch.isfinite(lse)
    assert torch.equal(torch.isneginf(natural), torch.isneginf(lse)) and not finite.all()
    # three roundings to float32: lse2 itself, ln 2, and their product
    bound = gamma(3, unit_roundoff(torch.float32)) * lse.abs()
    assert bool(((natural.double() - lse).abs() <= bound)[finite].all())


def test_token_major_lse_becomes_the_contracts_b_h_s_layout():
    b, s_q, h = 2, 3, 4
    token_major = torch.arange(b * s_q * h, dtype=torch.float32).view(b * s_q, h)  # row i·s_q + j, head k
    contract = fi.token_major_to_contract_lse(token_major, b, s_q)
    assert contract.shape == (b, h, s_q)
    for i in range(b):
        for k in range(h):
            for j in range(s_q):
                assert contract[i, k, j] == token_major[i * s_q + j, k]
    assert torch.equal(vl.rows_to_contract_lse(token_major, b, s_q), contract)


# ----------------------------------------------------------------------------------------------
# vLLM and SGLang: query rows, split-KV merge, token slots, scratch, argument binding
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_expanded_query_rows_see_what_the_contract_says(causal):
    lengths = torch.tensor([5, 0, 2], dtype=torch.int32)
    table = torch.tensor([[7, 3], [OUT_OF_RANGE_BLOCK] * 2, [1, OUT_OF_RANGE_BLOCK]], dtype=torch.int32)
    rows_table, rows_len = expand_query_rows(table, lengths, s_q=3, causal=causal)
    assert rows_table.shape == (9, 2) and torch.equal(rows_table[3:6], table[1:2].expand(3, 2))
    expected = [3, 4, 5, 0, 0, 0, 0, 1, 2] if causal else [5, 5, 5, 0, 0, 0, 2, 2, 2]
    assert rows_len.tolist() == expected and rows_len.dtype == torch.int32


def test_flattened_rows_reproduce_the_reference_row_by_row():
    case = _case(causal=True, dtype="float64")
    inputs = build_inputs(case)
    out, lse = paged_decode_reference(*inputs.arguments, causal=True)
    rows_table, rows_len = expand_query_rows(inputs.block_table, inputs.cache_seqlens, case.s_q, causal=True)
    q_rows = inputs.q.flatten(0, 1)[:, None]  # [b·s_q, 1, h, d]: one query per row
    row_out, row_lse = paged_decode_reference(q_rows, inputs.kv_cache, rows_table, rows_len, case.head_dim_v,
                                              case.softmax_scale)
    # both are float64 computations of the same values (summed over different padded lengths):
    # each is within the float64 decode bound of the exact result
    terms = paged_decode_terms(*inputs.arguments, causal=True)
    bounds = decode_bounds(terms, inputs.q, case.softmax_scale, case.head_dim_v,
                           RoundingModel(input=F64, accumulation=F64, output=F64, p=F64))
    assert bool(((row_out.view_as(out) - out).abs() <= 2 * bounds.out).all())
    row_lse = vl.rows_to_contract_lse(row_lse[..., 0], case.batch, case.s_q)
    assert torch.equal(torch.isneginf(row_lse), torch.isneginf(lse))
    finite = torch.isfinite(lse)
    assert bool(((row_lse - lse).abs()[finite] <= 2 * bounds.lse[finite]).all())


@pytest.mark.parametrize("splits, min_block", [(4, 1), (8, 32), (3, 1), (8, 1)])
def test_merging_the_nonempty_splits_gives_the_lse_over_all_keys(splits, min_block):
    """A two-stage split-KV decode written out in torch: each non-empty split's lse from the real
    scores, merged, equals the reference lse; empty splits hold garbage that must not matter."""
    case = _case(lengths=(1, 0, 31, 77, 32, 33), batch=6, s_q=1)
    inputs = build_inputs(case)
    terms = paged_decode_terms(*inputs.arguments)
    lengths = inputs.cache_seqlens
    nonempty = split_is_nonempty(lengths, splits, splits, min_block)
    per = [-(-(-(-n // splits)) // min_block) * min_block for n in case.lengths]
    partial = torch.full((case.batch, case.heads, splits), math.nan)
    for row, n in enumerate(case.lengths):
        for s in range(splits):
            start, end = s * per[row], min((s + 1) * per[row], n)
            assert bool(nonempty[row, s]) == (end > start)
            if end > start:
                partial[row, :, s] = torch.logsumexp(terms.scores[row, 0, :, start:end], -1).float()
    merged = merge_split_lse(partial, nonempty)
    reference = terms.lse[:, :, 0]
    assert torch.equal(torch.isneginf(merged), torch.isneginf(reference))
    # float32 roundings: each partial (u·|lse_s|); logsumexp's max shift, exp, sum of `splits`
    # terms, log and adding the max back (γ_{splits+6} of |result| + |max| + 1)
    u = unit_roundoff(torch.float32)
    top = torch.where(nonempty[:, None, :], partial.double().abs(), 0.0).amax(-1)
    bound = u * top + gamma(splits + 6, u) * (reference.abs() + top + 1)
    finite = torch.isfinite(reference)
    assert bool(((merged.double() - reference).abs() <= bound)[finite].all())


def test_vllm_scratch_has_one_lse_column_after_the_values():
    assert vl.scratch_shape(rows=6, heads=16, num_kv_splits=vl.NUM_KV_SPLITS, head_dim_v=512) == (6, 16, 4, 513)


def test_sglang_token_slots_pick_each_key_of_a_permuted_paged_cache():
    case = _case(s_q=1)
    inputs = build_inputs(case)
    kv_indptr, kv_indices = sg.token_slots(inputs.block_table, inputs.cache_seqlens, case.page_size)
    assert kv_indptr.tolist() == [0, 9, 9, 13, 26] and kv_indices.dtype == torch.int32
    tokens = sg.token_rows(inputs.kv_cache)  # [blocks·page, 1, d] view of the strided cache
    assert tokens.untyped_storage().data_ptr() == inputs.kv_cache.untyped_storage().data_ptr()
    for row in range(case.batch):
        slots = kv_indices[kv_indptr[row]:kv_indptr[row + 1]].long()
        assert torch.equal(tokens[slots, 0].to(F64), _reference_rows(inputs, row))


def test_sglang_token_slots_of_all_empty_rows():
    kv_indptr, kv_indices = sg.token_slots(torch.full((2, 1), OUT_OF_RANGE_BLOCK, dtype=torch.int32),
                                           torch.zeros(2, dtype=torch.int32), 64)
    assert kv_indptr.tolist() == [0, 0, 0] and kv_indices.tolist() == [0]


def test_an_unevenly_paged_cache_is_refused():
    buffer = torch.zeros(6, 4, 1, 8)
    with pytest.raises(ValueError, match="stride"):
        sg.token_rows(buffer[::2])  # every other page of a buffer: pages are not page_size rows apart


CURRENT_SGLANG = ("q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "attn_lse",
                  "num_kv_splits", "max_kv_splits", "sm_scale", "k_scale", "v_scale", "logit_cap", "sinks",
                  "xai_temperature_len")
OLDER_SGLANG = ("q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "num_kv_splits",
                "max_kv_splits", "sm_scale", "logit_cap")
OLDEST_SGLANG = ("q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "num_kv_splits",
                 "sm_scale", "logit_cap")


def test_sglang_scratch_follows_the_installed_signature():
    current = sg.scratch_for(CURRENT_SGLANG, rows=3, heads=16, head_dim_v=512, splits=8)
    assert current == sg.Scratch((3, 16, 8, 512), (3, 16, 8), True)
    older = sg.scratch_for(OLDER_SGLANG, rows=3, heads=16, head_dim_v=512, splits=8)
    assert older == sg.Scratch((3, 16, 8, 513), None, True)
    assert sg.scratch_for(OLDEST_SGLANG, 3, 16, 512, 8).splits_tensor is False


def test_bind_by_name_passes_what_the_installed_function_takes():
    values = dict(q=1, attn_lse=2, k_scale=3, lse=4, sm_scale=5)
    assert bind_by_name(CURRENT_SGLANG, values) == dict(q=1, attn_lse=2, k_scale=3, sm_scale=5)
    assert bind_by_name(OLDER_SGLANG, values) == dict(q=1, sm_scale=5)
    with pytest.raises(TypeError, match="kv_indptr"):
        bind_by_name(("q", "k_buffer"), values, required=("q", "kv_indptr"))
