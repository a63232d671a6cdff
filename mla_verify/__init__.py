"""mla_verify: property-based numerical verification of Multi-head Latent Attention kernels."""

from mla_verify.config import GQAConfig, MLAConfig, YarnConfig, gqa_preset, mla_preset
from mla_verify.decode.contract import Capabilities, Declined, declare
from mla_verify.decode.properties import check
from mla_verify.decode.case import DecodeCase

__all__ = ["Capabilities", "DecodeCase", "Declined", "GQAConfig", "MLAConfig", "YarnConfig", "check", "declare",
           "gqa_preset", "mla_preset"]
__version__ = "0.1.0"
