"""What both commands share: size parsing, one-line errors, an argparse that obeys them."""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from ..errors import PyhyveError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class UsageError(PyhyveError, ValueError):
    pass


def parse_size(text: str) -> int:
    """512M, 1G, 2048K; a bare number means MiB, as with bhyve's -m."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"bad size '{text}': use a number with K, M, G or T (e.g. 512M, 1G)")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value == 0:
        raise UsageError(f"bad size '{text}': must be more than zero")
    return value


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def guarded(prog: str, main: Callable[[], int]) -> int:
    """Run a command: a PyhyveError is one line (exit 1); anything else is a bug, said as
    such with its traceback (exit 70, EX_SOFTWARE), never dressed up as a user error."""
    try:
        return main()
    except PyhyveError as e:
        fail(prog, str(e))
    except Exception:
        traceback.print_exc()
        print(f"{prog}: internal error (a bug in pyhyve; the traceback above says where)",
              file=sys.stderr)
        return 70


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog.split()[0], f"{message} (see --help)", 2)
