"""`mla_verify.profiles` is `mla_verify.certify.profiles` (Hypothesis profiles and case-size limits), under the name it had before the
certification modules became one package."""

from mla_verify.certify.profiles import *  # noqa: F401,F403
from mla_verify.certify.profiles import __all__  # noqa: F401
