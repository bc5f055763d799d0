"""Exit codes, after sysexits(3), so that callers and systemd can tell failures apart."""

OK = 0
#: ``echod status``: the daemon is not running (LSB init-script convention).
NOT_RUNNING = 3
EX_USAGE = 64
EX_UNAVAILABLE = 69
#: An internal error, and the crash-loop breaker: workers kept dying.
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
