"""The decode contract under its first public name: `mla_verify.contract` is
`mla_verify.decode.contract` (users' kernels import `Capabilities`, `declare` and `Declined` from
either)."""

from mla_verify.decode.contract import *  # noqa: F401,F403
from mla_verify.decode.contract import __all__  # noqa: F401
