"""Hot pages: those the guest rewrites within milliseconds, which pre-copy holds back for
the pause (source.py). Sent before it they would be written again at once, each write a
fault on a page just protected (about 21 us on our hosts: a guest rewriting 512 MiB stalled
for seconds), and sent twice. They are found by reading sampled pages a few times, never by
protecting them: protecting even one page per 2 MiB stalled the guest for the whole window
here (docs/platform.md)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..machine.memory import PAGE

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ..machine.memory import GuestMemory

REGION = 512         # pages (2 MiB): a few sampled pages stand for each
PER_REGION = 4
MAX_SAMPLES = 4096   # pages read, each WINDOWS + 1 times: bigger guests get bigger regions
WINDOW_S = 0.01
WINDOWS = 2          # more than one: on a busy host the guest's vCPU may not run in one


def find_hot(mem: GuestMemory, data: npt.NDArray[np.bool_]) \
        -> tuple[npt.NDArray[np.bool_] | None, bytes]:
    """The pages of `data` (file pages that may hold data) in regions where a sampled page
    changed, or None; and the changed samples' bytes, to gauge how they encode."""
    import numpy as np

    n, r = len(data), REGION
    while True:  # bools only: a 64 GiB guest costs a few 16 MB passes, no index arrays
        used = np.flatnonzero(np.pad(data, (0, -n % r)).reshape(-1, r).any(axis=1))
        if len(used) * PER_REGION <= MAX_SAMPLES:
            break
        r *= 2
    if not len(used):
        return None, b""
    picks = []
    for reg in used:  # spread over each region's data pages
        where = np.flatnonzero(data[reg * r:(reg + 1) * r]) + reg * r
        picks.append(where[np.arange(PER_REGION) * len(where) // PER_REGION])
    pages = np.unique(np.concatenate(picks))

    def read() -> list[bytes]:
        return [bytes(mem.file_view(int(p) * PAGE, PAGE)) for p in pages]
    after = read()
    changed = np.zeros(len(pages), dtype=bool)
    for _ in range(WINDOWS):
        time.sleep(WINDOW_S)
        before, after = after, read()
        changed |= [b != a for b, a in zip(before, after, strict=True)]
    if not changed.any():
        return None, b""
    regions = np.zeros((n + r - 1) // r, dtype=bool)
    regions[pages[changed] // r] = True
    return np.repeat(regions, r)[:n] & data, b"".join(a for a, c in zip(after, changed,
                                                                          strict=True) if c)
