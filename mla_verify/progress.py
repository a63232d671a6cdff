"""`mla_verify.progress` is `mla_verify.certify.progress` (progress of a run), under the name it had before the
certification modules became one package."""

from mla_verify.certify.progress import *  # noqa: F401,F403
from mla_verify.certify.progress import __all__  # noqa: F401
