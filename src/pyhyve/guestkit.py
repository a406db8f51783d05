"""Host side of the test-guest kit: build the guests, check what they leave behind.

- `build()` compiles guests/ with make (no binaries are committed).
- `ab_check()` verifies the A-B invariant on a RAM image: the first byte of every working-set
  page reads v for the pages already done in the current pass and v-1 for the rest, with
  one boundary, and v agrees with the guest's own pass counter.
- `check_hashchain()` recomputes the hash-chain guest's chains from its console output.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import numpy as np

from .errors import PyhyveError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUESTS_SRC = os.path.join(REPO, "guests")
AB_MAGIC = 0x4241455659485950
PAGE = 4096
SCAN_LIMIT = 64 << 20  # the info page lives in the guest image, far below this
MASK64 = (1 << 64) - 1


class KitError(PyhyveError, RuntimeError):
    pass


def build(out: str | None = None) -> dict[str, str]:
    """Build every kit guest; returns {name: path to ELF}."""
    out = out or os.path.join(GUESTS_SRC, "build")
    try:
        subprocess.run(["make", "-s", "-C", GUESTS_SRC, f"OUT={out}"], check=True,
                       capture_output=True, text=True)
    except FileNotFoundError:
        raise KitError("building the guest kit needs make and gcc") from None
    except subprocess.CalledProcessError as e:
        raise KitError(f"guest kit build failed:\n{e.stdout}{e.stderr}") from None
    return {n: os.path.join(out, f"{n}.elf") for n in ("ab", "hashchain", "cpuinfo", "echo", "virtio")}


@dataclass(frozen=True)
class AbResult:
    ws_start: int
    ws_size: int
    passes: int
    value: int          # first-byte value of the pages done in the current pass
    boundary: int       # index of the first page not yet done (== pages when none pending)


def _find_info(ram: np.ndarray) -> tuple[int, int, int]:
    limit = min(len(ram), SCAN_LIMIT) // PAGE * PAGE
    words = ram[:limit].view(np.uint64).reshape(-1, PAGE // 8)
    hits = np.nonzero((words[:, 0] == AB_MAGIC) & (words[:, 1] == (~np.uint64(AB_MAGIC))))[0]
    if len(hits) != 1:
        raise KitError("A-B info page not found in the RAM image" if len(hits) == 0
                       else "several A-B info pages in the RAM image")
    row = words[hits[0]]
    return int(row[2]), int(row[3]), int(row[4])


def ab_check(ram: np.ndarray) -> AbResult:
    """Check the invariant on `ram` (uint8, index = guest-physical address)."""
    start, size, passes = _find_info(ram)
    if start % PAGE or size % PAGE or start + size > len(ram):
        raise KitError(f"A-B info page is corrupt (start={start:#x} size={size:#x})")
    firsts = ram[start:start + size:PAGE]
    n = len(firsts)
    done, pending = (passes + 1) & 0xFF, passes & 0xFF
    if n == 0:
        return AbResult(start, size, passes, pending, 0)
    mism = np.nonzero(firsts != firsts[0])[0]
    if len(mism) == 0:
        v = int(firsts[0])
        if v not in (done, pending):
            raise KitError(f"all {n} pages read {v}, but the guest has done {passes} passes")
        return AbResult(start, size, passes, v, n if v == done else 0)
    k = int(mism[0])
    if int(firsts[0]) != done or not np.all(firsts[k:] == pending):
        bad = k + int(np.nonzero(firsts[k:] != pending)[0][0]) if not np.all(
            firsts[k:] == pending) else 0
        raise KitError(f"A-B invariant broken: pages [0,{k}) read {int(firsts[0])}, page {bad} "
                       f"reads {int(firsts[bad])}; expected {done} then {pending} "
                       f"(passes={passes})")
    return AbResult(start, size, passes, done, k)


def ab_check_file(path: str, offset: int = 0, length: int | None = None) -> AbResult:
    """The invariant on a RAM image: a plain file, or a snapshot (any of its names)."""
    from .snapshot.files import current_files, meta_path, resolve_base

    if os.path.exists(meta_path(resolve_base(path))):
        path = current_files(path).memory
    ram = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=length)
    return ab_check(ram)


# --- hash chain -----------------------------------------------------------------------

def hashchain_step(h: int, n: int, rounds: int = 256) -> int:
    for _ in range(rounds):
        h ^= h >> 31
        h = (h * 0x9E3779B97F4A7C15) & MASK64
        h = (h + n) & MASK64
    return h


def hashchain_seed(cpu: int) -> int:
    return 0x6A09E667F3BCC908 ^ cpu


_LINE = re.compile(r"^H(\d+) (\d+) ([0-9a-f]{16})$")


def check_hashchain(text: str, rounds: int = 256) -> dict[int, int]:
    """Every "H<cpu> <n> <hash>" line must continue its CPU's chain exactly (no gap,
    no repeat, right value). Returns {cpu: last step}."""
    state: dict[int, tuple[int, int]] = {}
    for line in text.replace("\r", "").split("\n"):
        m = _LINE.match(line)
        if not m:
            continue
        cpu, n, h = int(m.group(1)), int(m.group(2)), int(m.group(3), 16)
        last_n, last_h = state.get(cpu, (0, hashchain_seed(cpu)))
        if n != last_n + 1:
            raise KitError(f"cpu{cpu}: step {n} follows step {last_n}")
        want = hashchain_step(last_h, n, rounds)
        if h != want:
            raise KitError(f"cpu{cpu}: step {n} hash {h:016x}, expected {want:016x}")
        state[cpu] = (n, h)
    return {cpu: n for cpu, (n, _h) in state.items()}


# --- virtio device guest ----------------------------------------------------------------

BLK_MAGIC = 0x4B4C425659485950
BLOCK = 4096


def _blk_words(rnd: int, block: int) -> np.ndarray:
    k = np.arange(BLOCK // 8, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = np.uint64(BLK_MAGIC) ^ np.uint64((rnd * 0x9E3779B97F4A7C15) & MASK64) \
            ^ np.uint64((block << 32) & MASK64) ^ k
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        return h ^ (h >> np.uint64(32))


def check_blocks(path: str, blocks: int) -> tuple[int, int]:
    """The virtio guest's disk image: every block whole and consistent (header and data of
    one round), rounds r for blocks [0, k) and r-1 (or r) after, one boundary. Returns
    (r, k)."""
    data = np.fromfile(path, dtype=np.uint64, count=blocks * BLOCK // 8)
    rounds = []
    for b in range(blocks):
        w = data[b * BLOCK // 8:(b + 1) * BLOCK // 8]
        if int(w[0]) != BLK_MAGIC or int(w[2]) != b:
            raise KitError(f"block {b}: bad header (magic {int(w[0]):#x}, index {int(w[2])})")
        want = _blk_words(int(w[1]), b)
        bad = np.nonzero(w[3:] != want[3:])[0]
        if len(bad):
            raise KitError(f"block {b} (round {int(w[1])}): word {int(bad[0]) + 3} is wrong")
        rounds.append(int(w[1]))
    top = rounds[0]
    k = next((i for i, r in enumerate(rounds) if r != top), blocks)
    if any(r != top - 1 for r in rounds[k:]):
        raise KitError(f"blocks hold rounds {sorted(set(rounds))}: more than one boundary")
    return top, k
