"""Exit codes from sysexits.h, as Postfix and Sendmail tools use them."""

from __future__ import annotations

OK = 0
USAGE = 64
DATAERR = 65
NOINPUT = 66
UNAVAILABLE = 69
SOFTWARE = 70
CANTCREAT = 73
TEMPFAIL = 75
CONFIG = 78
