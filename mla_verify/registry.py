"""`mla_verify.registry` is `mla_verify.certify.registry` (naming implementations), under the name it had before the
certification modules became one package."""

from mla_verify.certify.registry import *  # noqa: F401,F403
from mla_verify.certify.registry import __all__  # noqa: F401
