"""``python -m echod.upgrade [--config PATH | --defaults]``: the check the installed code must
pass before a running supervisor re-executes into it (echod.upgrader runs it).

It imports everything the supervisor and every mode need, loads the configuration, and
prints its version; asked (``ECHOD_HANDOVER_QUERY=1`` in its environment), also the newest
format of handed-over state it reads (``handover 2``), so that an older or newer running
image hands its state over in a form this code can take. This module is a command line: its
name is the interface between versions, so it stays as it is.
"""

from __future__ import annotations

import argparse
import os
import sys

from echod import exitcodes
from echod.errors import OperatorError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echod.upgrade")
    parser.add_argument("--config")
    parser.add_argument("--defaults", action="store_true")
    args = parser.parse_args(argv)
    from echod import __version__, handover, supervisor, upgrader
    from echod.config import MODES, load_config
    from echod.workers import worker_class

    del supervisor  # imported to prove it imports
    for mode in MODES:
        worker_class(mode)
    try:
        load_config(None if args.defaults else args.config)
    except OperatorError as exc:
        print(f"echod: {exc}", file=sys.stderr)
        return exc.exit_code
    print(__version__)
    if os.environ.get(upgrader.FORMAT_QUERY_ENV) == "1":
        print(f"handover {handover.FORMAT}")
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
