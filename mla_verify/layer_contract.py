"""The layer contract under its first name: `mla_verify.layer_contract` re-exports `mla_verify.layer`
(contract, case, bounds, checks, properties), so existing imports keep working."""

from mla_verify.layer import *  # noqa: F401,F403
from mla_verify.layer import __all__  # noqa: F401
