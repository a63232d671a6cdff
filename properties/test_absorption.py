"""Absorbed (MQA-mode) ≡ naive (MHA-mode), prefill-then-decode ≡ one prefill, and causality, for
MLA layers drawn beyond the presets.

Both modes compute the same function in exact arithmetic; in float64 they differ only by rounding
of sums over at most a few hundred terms, so a relative error of 1e-12 leaves a margin of ~10^3
over u·n while any wrong einsum, mask or scale shows at 1e-3 or more.
"""

import torch
from hypothesis import example, given, strategies as st

from mla_verify.config import MLAConfig
from mla_verify.reference import ExpandedCache, LatentCache, mla_forward, random_weights
from mla_verify.strategies import mla_configs

RELATIVE = 1e-12


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def layer_cases():
    """(config, batch, seq, seed): a description; tensors are built from it by _build."""
    return st.tuples(mla_configs(), st.integers(1, 2), st.integers(1, 6), st.integers(0, 2**31 - 1))


def _build(case):
    config, batch, seq, seed = case
    g = torch.Generator().manual_seed(seed)
    weights = random_weights(config, g)
    return config, weights, torch.randn(batch, seq, config.hidden_size, generator=g, dtype=torch.float64)


# h == s: apply_rope once guessed the position axis from shapes and rotated q by head index instead
# of position whenever the head count equalled the prefill length.
HEADS_EQUAL_POSITIONS = (MLAConfig("h=s", hidden_size=2, num_heads=2, q_lora_rank=None, kv_lora_rank=1,
                                   qk_nope_head_dim=1, qk_rope_head_dim=2, v_head_dim=1), 1, 2, 0)


@given(case=layer_cases())
def test_absorbed_equals_naive(case):
    config, weights, x = _build(case)
    absorbed = mla_forward(config, weights, x, mode="absorbed")
    naive = mla_forward(config, weights, x, mode="naive")
    error = _relative_error(absorbed, naive)
    assert error <= RELATIVE, f"absorbed vs naive: relative error {error:.3g} > {RELATIVE} for {config}"


@given(case=layer_cases(), split=st.integers(0, 5), mode=st.sampled_from(["absorbed", "naive"]))
@example(case=HEADS_EQUAL_POSITIONS, split=0, mode="absorbed")
@example(case=HEADS_EQUAL_POSITIONS, split=0, mode="naive")
def test_prefill_then_decode_equals_one_prefill(case, split, mode):
    config, weights, x = _build(case)
    b, s, _ = x.shape
    split = min(split, s - 1)
    full = mla_forward(config, weights, x, mode=mode)
    cache = (LatentCache if mode == "absorbed" else ExpandedCache).allocate(config, b, s)
    pieces = [mla_forward(config, weights, x[:, :split + 1], 0, cache, mode)]
    for pos in range(split + 1, s):  # then one token at a time
        pieces.append(mla_forward(config, weights, x[:, pos:pos + 1], pos, cache, mode))
    incremental = torch.cat(pieces, dim=1)
    error = _relative_error(incremental, full)
    assert error <= RELATIVE, f"{mode}: prefill {split + 1} then decode vs one prefill: {error:.3g} > {RELATIVE}"


@given(case=layer_cases(), changed=st.integers(0, 5), mode=st.sampled_from(["absorbed", "naive"]))
def test_changing_a_later_token_never_changes_an_earlier_output(case, changed, mode):
    config, weights, x = _build(case)
    changed = min(changed, x.shape[1] - 1)
    before = mla_forward(config, weights, x, mode=mode)
    x2 = x.clone()
    x2[:, changed] = -3 * x2[:, changed] + 1
    after = mla_forward(config, weights, x2, mode=mode)
    # masked keys get probability exactly 0, so earlier positions must be bit-identical
    assert torch.equal(before[:, :changed], after[:, :changed]), (
        f"{mode}: changing token {changed} moved an earlier output by "
        f"{(before[:, :changed] - after[:, :changed]).abs().max().item():.3g}")
    if changed < x.shape[1]:
        assert not torch.equal(before[:, changed:], after[:, changed:]), "the changed token itself had no effect"
