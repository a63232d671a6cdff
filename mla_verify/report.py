"""`mla_verify.report` is `mla_verify.certify.report` (the HTML report), under the name it had before the
certification modules became one package."""

from mla_verify.certify.report import *  # noqa: F401,F403
from mla_verify.certify.report import __all__  # noqa: F401
