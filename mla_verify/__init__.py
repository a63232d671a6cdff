"""mla_verify: property-based numerical verification of Multi-head Latent Attention kernels."""

from mla_verify.config import GQAConfig, MLAConfig, YarnConfig, gqa_preset, mla_preset
from mla_verify.contract import Capabilities, declare

__all__ = ["Capabilities", "GQAConfig", "MLAConfig", "YarnConfig", "declare", "gqa_preset", "mla_preset"]
__version__ = "0.1.0"
