"""Weight-layout bugs of a model port: where W_UK ends and W_UV begins, and the order of the
heads' outputs before W_O."""

from __future__ import annotations

from .common import TemplateMLA


class SplitAtVHeadDim(TemplateMLA):
    """W_UV read from rows d_v … 2·d_v − 1 of each head's block of wkv_b instead of d_n … d_n + d_v − 1:
    the split index taken from v_head_dim, harmless for DeepSeek-V3 (d_n = d_v = 128) and wrong for
    GLM-4.7-Flash (192/256) or any config with d_n ≠ d_v. With d_n > d_v the values are silently
    wrong (part of W_UK is used as W_UV); with d_n < d_v the slice is short and the output
    projection raises."""

    def split_wkv_b(self):
        wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)
        dv = self.v_head_dim
        return wkv_b[:, :self.qk_nope_head_dim], wkv_b[:, dv:2 * dv]  # BUG: split at d_v, not d_n


class HeadsPermutedBeforeWo(TemplateMLA):
    """The per-head outputs concatenated in the wrong order before W_O: o [b, s, h, d_v] flattened as
    [b, s, d_v, h] (a transpose left over from a [b, h, s, d_v] layout), so W_O's columns meet the
    wrong head's features. Needs h ≥ 2 and d_v ≥ 2."""

    def output(self, o):
        return self.wo(o.transpose(2, 3).flatten(2))  # BUG: heads and features swapped
