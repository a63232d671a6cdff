"""The decode half: a paged MLA decode kernel (FlashMLA's layout) judged against the float64
reference.

    contract     the kernel's signature, tensor layouts, `Capabilities` and `declare`, input validation
    case         `DecodeCase`: the JSON description of one call's inputs
    inputs       tensors built from a case, adversarially laid out (NaN slots, canaries, strides)
    strategies   Hypothesis strategies that draw cases inside a kernel's declared capabilities
    bounds       the sound and sharp error bounds of a case
    checks       calling a kernel, comparing with the reference, failure kinds and signatures
    properties   the decode properties a certificate runs, and `check` for one case by hand
    fp8          the FP8 cache formats (fp8_ds_mla, per-tensor e4m3), exact dequantisation, the quantiser
    sparse       sparse (top-k) index rules, how the suite lays index lists out, attention sinks
"""
