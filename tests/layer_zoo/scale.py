"""Softmax-scale bugs of a model port: the YaRN temperature and the head width the scale is taken from."""

from __future__ import annotations

from .common import EXAMPLE, TemplateMLA


class YarnMscaleMissing(TemplateMLA):
    """The YaRN attention temperature left out of the softmax scale: (d_n + d_r)^-1/2 instead of
    (d_n + d_r)^-1/2·m² with m = 0.1·mscale_all_dim·ln(factor) + 1. DeepSeek's own inference code
    applies m only when max_seq_len exceeds the original context, so a port that copies its scale
    but not that condition (or sets max_seq_len below it) runs DeepSeek-V3 with a scale 1.86x too
    small. Needs YaRN with factor > 1 and mscale_all_dim > 0."""

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        self.softmax_scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5  # BUG: no m²


class YarnMscaleDoubled(TemplateMLA):
    """The YaRN temperature applied twice: the softmax scale carries m², and the port also folds
    m² into its scale a second time (a scale taken from a config that already includes the
    temperature, then corrected again as the reference code does), giving m⁴. Needs YaRN with
    factor > 1 and mscale_all_dim > 0."""

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        m = EXAMPLE.yarn_temperature(args.rope_factor, args.mscale_all_dim)
        self.softmax_scale = self.softmax_scale * m ** 2  # BUG: m² again


class ScaleFromNopeDim(TemplateMLA):
    """The softmax scale taken from qk_nope_head_dim (the per-head width of the latent part) instead
    of the full query-key width d_n + d_r, as a port reusing an MHA attention's `head_dim ** -0.5`
    with head_dim = qk_nope_head_dim does: for DeepSeek-V3 128^-1/2 instead of 192^-1/2."""

    def __init__(self, args, **kwargs):
        super().__init__(args, **kwargs)
        m = EXAMPLE.yarn_temperature(args.rope_factor, args.mscale_all_dim)
        self.softmax_scale = self.qk_nope_head_dim ** -0.5 * m ** 2  # BUG: d_n instead of d_n + d_r
