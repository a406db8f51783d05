"""The source side: pre-copy (live) or stop-and-copy (warm) migration of a running VM.

Live: dirty logging on, every non-zero page sent once, then rounds of the pages written
meanwhile until what is left fits the downtime target at the measured bandwidth; the guest
is slowed (auto-converge) when it writes faster than we send. Then pause, send the last
dirty pages and the vCPU/VM/device state, and wait for the destination to report the guest
running. Only then is the source VM stopped. Any failure or cancel before that resumes the
source guest as it was.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MigrationSourceFailed
from ..machine.dirty import DirtyConsumer, runs_of
from ..machine.memory import PAGE
from ..pipeline.pages import (
    chunks,
    data_pages,
    encode_runs,
    guest_runs,
    nonzero_among,
    page_flags,
)
from ..pipeline.record import machine_record
from ..pipeline.sections import device_list, to_sections
from .encoding import encoder
from .hot import find_hot
from .postcopy import NotStarted, PostcopySource, new_session
from .protocol import (
    LIMITS,
    MAX_PAGES_PER_FRAME,
    MEM_HEADER,
    PROTOCOL_VERSION,
    Channel,
    Enc,
    PeerError,
    ProtocolError,
    T,
)
from .security import authenticate, tls_context

if TYPE_CHECKING:
    from ..vm import VirtualMachine

MAX_ROUNDS = 30
THROTTLE_MAX = 0.99


class MigrationError(MigrationSourceFailed, RuntimeError):
    pass


class Cancelled(MigrationError):
    pass


@dataclass
class Options:
    live: bool = True
    downtime_ms: float = 5.0
    bandwidth: float = 0.0           # bytes/s cap; 0 = unlimited
    compress: str = "auto"           # auto | none | zstd | lz4
    auto_converge: bool = True
    tls_dir: str | None = None
    insecure: bool = False
    connect_timeout: float = 10.0    # connecting and authenticating
    io_timeout: float = 60.0         # no progress for this long fails, while the guest runs
    paused_io_timeout: float = 10.0  # ... and while it is paused (warm, or the final step):
    # a stalled destination must not keep the guest stopped for long
    postcopy: bool = False           # switch after `postcopy_after` rounds; the rest follows
    postcopy_after: int = 0          # pre-copy rounds first (0: switch at once)
    recover_timeout: float = 600.0   # post-copy: how long to keep reconnecting after a cut


@dataclass
class Stats:
    state: str = "setup"
    rounds: int = 0
    pages_per_round: list[int] = field(default_factory=list)
    ms_per_round: list[float] = field(default_factory=list)
    zero_pages: int = 0
    bytes_sent: int = 0
    throttle: float = 0.0
    total_s: float = 0.0
    downtime_s: float = 0.0
    error: str = ""
    phases_ms: dict[str, float] = field(default_factory=dict)  # where the downtime went
    pages_sent: int = 0              # so far, all rounds: --migrate-status during a round
    downtime_target_ms: float = 0.0
    target: str = ""
    postcopy_pages_left: int = -1    # post-copy: pages the destination has yet to get
    hot_pages: int = 0               # pre-copy: rewritten too fast to send before the pause

    @property
    def target_missed(self) -> bool:
        return self.state == "completed" and self.downtime_s * 1e3 > self.downtime_target_ms > 0

    def line(self) -> str:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in self.phases_ms.items())
        missed = (f", missed the {self.downtime_target_ms:g} ms target" if self.target_missed
                  else "")
        to = f", destination {self.target}" if self.target else ""
        if self.postcopy_pages_left >= 0:
            to += f", post-copy pages to go {self.postcopy_pages_left}"
        return (f"{self.state}: total {self.total_s * 1e3:.1f} ms, downtime "
                f"{self.downtime_s * 1e3:.1f} ms{missed} ({phases}), "
                f"{self.pages_sent} pages, {self.bytes_sent / (1 << 20):.1f} "
                f"MiB sent, {self.rounds} rounds, pages per round {self.pages_per_round} "
                f"in ms {self.ms_per_round}, "
                f"{self.zero_pages} zero pages skipped, {self.hot_pages} hot pages held for "
                f"the pause, max throttle {self.throttle:.0%}{to}")


def parse_target(target: str, default_port: int) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, or bhyve's HOST,PORT (HOST alone: the default port)."""
    t = target.strip()
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port = rest.lstrip(":,") or str(default_port)
    elif "," in t:
        host, _, port = t.rpartition(",")
    elif t.count(":") == 1:
        host, _, port = t.partition(":")
    else:
        host, port = t, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MigrationError(f"bad address '{target}': use HOST:PORT")
    return host, int(port)


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    """Where a destination listens: PORT alone or *:PORT (every address, IPv6 and IPv4),
    HOST:PORT, [V6]:PORT ([::] is every IPv6 address), HOST,PORT, or HOST (the default
    port). Host "" means every address."""
    t = text.strip()
    if t.isdigit():
        if not 0 < int(t) < 65536:
            raise MigrationError(f"bad port '{text}'")
        return "", int(t)
    host, port = parse_target(t, default_port)
    return ("" if host == "*" else host), port


class Migration:
    """Runs in its own thread; `stats` may be read at any time, `cancel()` from anywhere."""

    def __init__(self, vm: VirtualMachine, host: str, port: int, key: bytes | None,
                 opts: Options) -> None:
        self.vm, self.host, self.port, self.key, self.opts = vm, host, port, key, opts
        self.stats = Stats(downtime_target_ms=opts.downtime_ms if opts.live and not
                           opts.postcopy else 0.0,
                           target=f"{host}:{port}")
        self._cancel = threading.Event()
        self.done = threading.Event()
        self.ch: Channel | None = None
        self.dirty: DirtyConsumer | None = None
        self._paused_by_us = False
        self._sent_pages = 0
        self._acked = -1
        self._rate = 0.0  # guest memory moved per second, from rounds of some size
        self._t_start = 0.0
        self._budget_t = 0.0
        self._budget_bytes = 0
        self._postcopy: PostcopySource | None = None
        self._at_switch = (0, 0)  # bytes and pages sent before the post-copy switch
        self._claimed = False  # claim_recovery() made this one running again
        self._go_sent = False
        self._session = new_session() if opts.postcopy else ""
        self._hot: Any = None  # pre-copy: pages held back for the pause (_hold_back_hot)
        self._hot_cost = 0.0   # ... and the seconds per byte they are expected to take

    # --- control ---------------------------------------------------------------------
    @property
    def past_switch(self) -> bool:
        """Post-copy with GO sent: the guest is the destination's, and this VM holds pages
        it still needs: no cancel, no destroy."""
        return self.opts.postcopy and self._go_sent and not self.done.is_set()

    def cancel(self) -> None:
        if self.past_switch:
            return  # the guest runs over there: this side cannot take it back
        self._cancel.set()
        if self.ch is not None:
            with contextlib.suppress(OSError):
                self.ch.sock.shutdown(socket.SHUT_RDWR)

    def status_line(self) -> str:
        """The stats line, with the elapsed time while the migration runs."""
        if not self.done.is_set() and self._t_start:
            self.stats.total_s = time.perf_counter() - self._t_start
        if self._postcopy is not None:
            self.stats.postcopy_pages_left = self._postcopy.pages_left
        return self.stats.line()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    def run(self) -> Stats:
        self._t_start = time.perf_counter()
        try:
            self._run()
            self.stats.state = "completed"
        except BaseException as e:  # every failure: the source guest must keep running
            late = self.stats.state == "handing over"
            postcopy = self.opts.postcopy and self._go_sent
            self.stats.state = "cancelled" if isinstance(e, Cancelled) or self._cancel.is_set() \
                else "failed"
            self.stats.error = str(e) or type(e).__name__
            if late:  # GO went out: the destination may run the guest; never run two
                self.stats.error += (" (lost after the hand-over: the destination may be "
                                     "running the guest, so this one stays paused; check the "
                                     "destination, then resume or destroy this one)")
            if postcopy:
                left = self._postcopy.pages_left if self._postcopy else -1
                self.stats.error += (f" (post-copy: the guest runs on the destination and "
                                     f"this VM, kept paused, holds {left} pages it has not "
                                     "received; do not destroy it while the destination "
                                     "runs)")
                late = True
            self._recover(keep_paused=late)
        finally:
            gc.enable()
            self.stats.total_s = time.perf_counter() - self._t_start
            if self.ch:
                self.ch.close()
            self.done.set()
        return self.stats

    def _recover(self, keep_paused: bool = False) -> None:
        self.vm.set_throttle(0)
        if keep_paused and self._paused_by_us:
            self.vm.pause()  # a user pause: only the user ends it
        if self.dirty:
            with contextlib.suppress(OSError):
                self.dirty.stop()
        if self._paused_by_us:
            self.vm.release()
        self._paused_by_us = False

    # --- the migration -------------------------------------------------------------------
    def _connect(self) -> Channel:
        try:
            sock = socket.create_connection((self.host, self.port), self.opts.connect_timeout)
        except OSError as e:
            raise MigrationError(f"cannot connect to {self.host}:{self.port}: "
                                 f"{e.strerror or e}") from None
        sock.settimeout(self.opts.connect_timeout)  # until authenticated
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.opts.tls_dir:
            try:
                sock = tls_context(self.opts.tls_dir, server=False).wrap_socket(sock)
            except (OSError, ValueError) as e:
                sock.close()
                raise MigrationError(f"TLS handshake with {self.host}:{self.port} failed: {e} "
                                     "(does the destination use --tls-dir with the same "
                                     "certificate?)") from None
        return Channel(sock, b"S", b"D")

    def _hello(self) -> dict[str, Any]:
        extra = {"postcopy": self._session} if self.opts.postcopy else {}
        return {"protocol": PROTOCOL_VERSION, "live": self.opts.live,
                "compress": self.opts.compress, **extra, **machine_record(self.vm)}

    def _run(self) -> None:
        vm, opts, st = self.vm, self.opts, self.stats
        if vm.state not in ("running", "paused"):
            raise MigrationError(f"VM is {vm.state}")
        refusal = vm.save_refusal()
        if refusal:
            raise MigrationError(f"cannot migrate {vm.config.name}: {refusal}")
        was_paused = vm.user_paused  # migrated warm, and paused over there too
        t = time.perf_counter()
        self.ch = ch = self._open()
        st.phases_ms["connect+auth"] = (time.perf_counter() - t) * 1e3
        ch.send_json(T.HELLO, {**self._hello(), "paused": was_paused})
        accept = ch.recv(T.ACCEPT).json()  # a REFUSE raises PeerError with the reason
        if opts.postcopy and accept.get("postcopy") is not True:
            raise MigrationError(f"{self.host}:{self.port} does not offer post-copy (an "
                                 "older pyhyve?)")
        st.phases_ms["setup"] = (time.perf_counter() - self._t_start) * 1e3  # incl. the above
        self._check_cancel()
        st.state = "active"
        if opts.postcopy:
            self._run_postcopy(was_paused)
            return
        if was_paused or not opts.live:
            self._pause()  # a hold of our own, even on a paused guest: nothing else resumes it
            self._send_runs(self._announce(guest_runs(vm.memory)), round_no=0)
        else:
            self.dirty = vm.dirty.consumer("migration", deferred=True)
            if opts.auto_converge and not self.dirty.deferred:
                self._probe_dirty_rate()  # deferred, every page counts as written: no probe
            runs = self._announce(guest_runs(vm.memory))
            if self.dirty.deferred:
                runs = self._hold_back_hot(runs)
                self._arm_the_rest(runs)
            self._send_runs(runs, round_no=0)
            self._precopy()
        self._finish()

    def _open(self) -> Channel:
        """A connected, authenticated channel (the migration's, or a post-copy
        reconnection's)."""
        ch = self._connect()
        try:
            authenticate(ch, self.key, bool(self.opts.tls_dir), self.opts.insecure)
        except ProtocolError as e:
            ch.close()
            hint = "" if self.opts.tls_dir else (" (a destination started with --tls-dir "
                                                 "drops sources that do not use TLS)")
            raise MigrationError(f"handshake with {self.host}:{self.port} failed: {e}{hint}") \
                from None
        ch.sock.settimeout(self.opts.io_timeout)
        return ch

    def _run_postcopy(self, was_paused: bool) -> None:
        """Pre-copy rounds (postcopy_after), the switch, then the rest after it."""

        vm, opts = self.vm, self.opts
        if opts.postcopy_after > 0 and not was_paused:
            self.dirty = vm.dirty.consumer("migration", deferred=True)
            runs = guest_runs(vm.memory)
            if self.dirty.deferred:
                self._arm_the_rest(runs)
            self._send_runs(self._announce(runs), round_no=0)
            for round_no in range(1, opts.postcopy_after):
                self._check_cancel()
                self._send_runs(runs_of(self.dirty.fetch()), round_no)
            self._pause()
            pending = self.dirty.fetch()
        else:  # every page that may hold data (zero ones go as ZERO records): no
            self._pause()  # reading of guest memory while the guest waits
            pending = data_pages(vm.memory)
        raw = encode_runs(runs_of(pending))
        if len(raw) > LIMITS[T.POSTCOPY]:
            raise MigrationError("too many scattered pages for one post-copy switch")
        self.ch.send(T.POSTCOPY, raw)  # type: ignore[union-attr]
        cut = ""
        try:
            self._finish(stop=False)
        except (ProtocolError, PeerError, OSError) as e:
            if not self._go_sent:
                raise  # the destination never ran the guest: ours to resume
            cut = str(e) or type(e).__name__  # it may run it: go on as after a cut
        self.stats.state = "postcopy"
        self._postcopy = PostcopySource(
            self.ch, vm.memory, pending, self._session, self._open,  # type: ignore[arg-type]
            encoder(opts.compress), opts.recover_timeout, self._postcopy_state, self._limit)
        self._at_switch = (self.stats.bytes_sent, self.stats.pages_sent)
        self._after_switch(cut)

    def _after_switch(self, cut: str) -> None:
        """Push and serve until DONE (reconnecting after a cut), then let the VM go."""
        pc = self._postcopy
        assert pc is not None
        try:
            pc.run(cut)
        except NotStarted as e:  # nothing runs over there: ours to resume (run()'s failure
            self._go_sent = False  # handling does, as before GO)
            self._paused_by_us = True
            raise MigrationError(f"post-copy: {e}; the guest runs here again") from None
        self.stats.bytes_sent = self._at_switch[0] + pc.bytes_sent
        self.stats.pages_sent = self._at_switch[1] + pc.pages_sent
        self.stats.postcopy_pages_left = 0
        self.stats.phases_ms["postcopy requests"] = pc.requests
        self.stats.phases_ms["postcopy reconnects"] = pc.reconnects
        self.ch = pc.ch
        self.vm.stop(f"migrated to {self.host}:{self.port} (post-copy)", 0)

    def recoverable(self) -> bool:
        """A post-copy that gave up after the switch (a cut it could not mend in time, not
        the destination's own failure): this VM, kept paused, still holds pages the
        destination's guest needs, and the session can be resumed."""
        pc = self._postcopy
        return (self.done.is_set() and pc is not None and self._go_sent
                and not pc.dest_failed and self.stats.state == "failed"
                and not self.vm.stopped)

    def claim_recovery(self) -> None:
        """Make this migration a running one again, for `recover` (one at a time: the
        caller holds the VM's control lock, so no other command slips in between)."""
        if not self.recoverable():
            raise MigrationError("no post-copy migration to recover here (only one that "
                                 "gave up after its switch, cut off, can be)")
        self.done.clear()
        self._claimed = True
        self.stats.state, self.stats.error = "postcopy: reconnecting", ""

    def recover(self, recover_timeout: float | None = None) -> Stats:
        """Try again after a post-copy gave up (`pyhyvectl --migrate-recover`): reconnect
        to the same destination with the same session, for `recover_timeout` seconds (the
        migration's own by default), and finish the transfer. On failure the VM stays
        paused, as before, and this can be called again; if the destination says it never
        started the guest, the guest runs here again."""
        if not self._claimed:
            self.claim_recovery()
        self._claimed = False
        pc = self._postcopy
        assert pc is not None
        if recover_timeout is not None:
            pc.recover_timeout = recover_timeout
        self._t_start = time.perf_counter()
        try:
            self._after_switch("resumed by pyhyvectl --migrate-recover")
            self.stats.state = "completed"
        except BaseException as e:
            self.stats.state = "failed"
            if not self._go_sent:  # never started over there (NotStarted): ours again
                self._paused_by_us = False
                self.vm.resume()
                self.stats.error = str(e)
            else:  # still the destination's guest: stay paused
                self.stats.error = (f"{e or type(e).__name__} (post-copy: the guest runs on "
                                    f"the destination and this VM, kept paused, holds "
                                    f"{pc.pages_left} pages it has not received; do not "
                                    "destroy it while the destination runs)")
        finally:
            self.stats.total_s = time.perf_counter() - self._t_start
            if self.ch:
                self.ch.close()
            self.done.set()
        return self.stats

    def _postcopy_state(self, state: str, why: str) -> None:
        self.stats.state = state
        self.stats.error = why

    def _pause(self) -> None:
        gc.disable()  # no collector pause inside the downtime; run() turns it back on
        self._t_pause = time.perf_counter()
        self.vm.hold()
        self._paused_by_us = True
        self.ch.sock.settimeout(self.opts.paused_io_timeout)  # type: ignore[union-attr]
        self.stats.phases_ms["pause"] = (time.perf_counter() - self._t_pause) * 1e3

    def _announce(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Tell the destination which pages are coming, so it can fault them in ahead of
        the data (first touch of fresh memory is the slowest step of receiving). Every page
        outside the runs is a zero page that is never sent."""
        self.stats.zero_pages += self.vm.memory.size // PAGE - sum(n for _, n in runs)
        raw = encode_runs(runs)
        if len(raw) <= 16 << 20:
            self.ch.send(T.RUNS, raw)  # type: ignore[union-attr]
        return runs

    def _arm_the_rest(self, runs: list[tuple[int, int]]) -> None:
        """Deferred dirty logging: round 0 arms each chunk of `runs` as it sends it, so
        protect every other page now, but those held back for the pause. One that the guest
        made non-zero since `runs` was taken, before this protected it, went unlogged: it
        goes in round 1."""
        import numpy as np

        rest = np.ones(self.vm.memory.size // PAGE, dtype=bool)
        for p, n in runs:
            rest[p:p + n] = False
        if self._hot is not None:
            rest &= ~self._hot
        dirty = self.dirty
        assert dirty is not None
        dirty.arm_mask(rest)
        dirty.give_back(nonzero_among(self.vm.memory, rest))

    ASSUMED_BANDWIDTH = 1e9   # bytes/s before the first round measures it
    PROBE_S = 0.005

    def _probe_dirty_rate(self) -> None:
        """Watch the guest for a few ms. One that writes memory much faster than we can
        send it would make every round resend everything: slow it from the start."""
        time.sleep(self.PROBE_S)
        rate = int(self.dirty.fetch().sum()) * PAGE / self.PROBE_S  # type: ignore[union-attr]
        self.stats.phases_ms["probe dirty MB/s"] = rate / 1e6
        if rate > 2 * self.ASSUMED_BANDWIDTH:
            self.vm.set_throttle(min(THROTTLE_MAX, 1 - self.ASSUMED_BANDWIDTH / rate / 2))
            self.stats.throttle = self.vm.throttle

    MEMORY_RATE = 3e9  # bytes/s the destination decodes or copies into fresh memory

    def _hold_back_hot(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Hold the hot pages (hot.py) back for the pause; whether the pause can take them
        is decided before it (`_precopy`). Returns round 0's runs: the rest."""
        import numpy as np

        mem = self.vm.memory
        inrun = np.zeros(mem.size // PAGE, dtype=bool)
        for p, k in runs:
            inrun[p:p + k] = True
        hot, sample = find_hot(mem, inrun | data_pages(mem))  # zero pages may turn hot too
        if hot is None:
            return runs
        self._hot, self.stats.hot_pages = hot, int(hot.sum())
        # what a byte of them will cost in the pause: on the wire as the sample encodes,
        # then into the destination's memory
        _, body = encoder(self.opts.compress, paused=not self.opts.bandwidth)(
            memoryview(sample))
        self._hot_cost = len(body) / len(sample) / self.ASSUMED_BANDWIDTH + 1 / self.MEMORY_RATE
        return runs_of(inrun & ~hot)

    def _hot_fits(self, pages: int, target: float) -> bool:
        """Would the held-back pages, with `pages` more, fit the downtime target? If not,
        they join the rounds (and the guest pays the faults)."""
        nbytes = (self.stats.hot_pages + pages) * PAGE
        cost = 1 / self._rate if self._rate else self._hot_cost
        return nbytes * cost <= target

    SMALL_SET = 64        # pages: a final set this small fits any downtime target
    RATE_MIN_PAGES = 256  # rounds that moved fewer pages say more about latency than rate

    def _precopy(self) -> None:
        opts, st = self.opts, self.stats
        target = opts.downtime_ms / 1e3
        for round_no in range(1, MAX_ROUNDS + 1):
            self._check_cancel()
            mask = self.dirty.fetch()  # type: ignore[union-attr]
            pages = int(mask.sum())
            if self._fits(pages, target):
                # let the destination drain what is in flight first, so the downtime is
                # the last pages and the state, not a backlog
                self._wait_acks(round_no - 1)
                mask |= self.dirty.fetch()  # type: ignore[union-attr]
                pages = int(mask.sum())
            stop = self._fits(pages, target) or round_no == MAX_ROUNDS
            if self._hot is not None and not self.dirty.deferred:  # type: ignore[union-attr]
                self._hot, st.hot_pages = None, 0  # a second consumer: they came as written
            if self._hot is not None and round_no < MAX_ROUNDS \
                    and not self._hot_fits(pages if stop else 0, target):
                mask |= self._hot  # too many for the pause: sent like any other page
                pages, stop, self._hot, st.hot_pages = int(mask.sum()), False, None, 0
            if stop:
                self._pause()
                final = mask | self.dirty.fetch()  # type: ignore[union-attr]
                if self._hot is not None:
                    final |= self._hot
                self._send_runs(runs_of(final), round_no)
                return
            self._send_runs(runs_of(mask), round_no)
            bw = self._rate
            if opts.auto_converge and bw:
                # what the guest dirtied while we sent the last round vs what fits the target
                need = target * bw
                if pages * PAGE > need:
                    free = (1 - self.vm.throttle) * max(0.01, min(0.5, need / (pages * PAGE)))
                    self.vm.set_throttle(min(THROTTLE_MAX, 1 - free))
                    st.throttle = max(st.throttle, self.vm.throttle)

    def _fits(self, pages: int, target: float) -> bool:
        """Would sending `pages` now stay within the downtime target?"""
        if pages <= self.SMALL_SET:
            return True
        return bool(self._rate) and pages * PAGE / self._rate <= target

    def _wait_acks(self, round_no: int) -> None:
        """Read the destination's ROUND acknowledgements up to `round_no`."""
        while self._acked < round_no:
            self._acked = int(self.ch.recv(T.ROUND).json().get("round", -1))  # type: ignore[union-attr]

    def _finish(self, stop: bool = True) -> None:
        vm, ch, st = self.vm, self.ch, self.stats
        assert ch is not None
        t = time.perf_counter()
        st.phases_ms["pause+last pages"] = (t - self._t_pause) * 1e3
        state = vm.capture()
        for name, blob in to_sections(state, None):
            raw = name.encode()
            ch.send(T.STATE, len(raw).to_bytes(2, "little"), raw, blob)
        ch.send_json(T.COMPLETE, {"devices": device_list(vm, state)})
        st.state = "completing"
        t2 = time.perf_counter()
        st.phases_ms["capture+send state"] = (t2 - t) * 1e3
        while ch.recv(T.READY, T.ROUND).type == T.ROUND:  # late acknowledgements
            pass
        # the point of no return: from GO on the destination may run the guest, so a
        # failure after this keeps ours paused (handed_over) instead of resuming it
        self._check_cancel()
        st.state = "handing over"
        self._go_sent = True  # from here on the destination may run the guest
        if not stop:  # post-copy: it is the destination's guest now, never resumed here
            self._paused_by_us = False
        ch.send_json(T.GO, {})
        ch.recv(T.RUNNING)
        st.phases_ms["destination load+start"] = (time.perf_counter() - t2) * 1e3
        st.downtime_s = time.perf_counter() - self._t_pause
        st.bytes_sent = ch.bytes_sent
        self.vm.set_throttle(0)
        self._paused_by_us = False  # the guest is the destination's: never released here
        if self.dirty:  # post-copy: nothing more to track; the guest never runs here again
            self.dirty.stop()
            self.dirty = None
        if stop:
            vm.stop(f"migrated to {self.host}:{self.port}", 0)

    # --- memory ----------------------------------------------------------------------------
    def _send_runs(self, runs: list[tuple[int, int]], round_no: int) -> None:
        ch, mem, st = self.ch, self.vm.memory, self.stats
        assert ch is not None
        sent = 0
        t0 = time.perf_counter()
        # lz4 while the guest waits, unless a bandwidth cap makes bytes the cost
        compress = encoder(self.opts.compress,
                           paused=self._paused_by_us and not self.opts.bandwidth)
        dirty = self.dirty if self.dirty and self.dirty.deferred and not self._paused_by_us \
            else None
        for off, data in chunks(mem, runs, MAX_PAGES_PER_FRAME * PAGE):
            self._check_cancel()
            if dirty:  # protect just before reading: a write from now on is logged
                dirty.arm(off // PAGE, len(data) // PAGE)
            nz = page_flags(data)
            first = off // PAGE
            if nz.all():  # the common case: one frame, no zero-run bookkeeping
                data_runs, zero_runs = [(0, len(nz))], []
            else:
                data_runs, zero_runs = runs_of(nz), runs_of(~nz)
            for s, k in data_runs:
                chunk = data[s * PAGE:(s + k) * PAGE]
                enc, body = compress(chunk)
                if enc == Enc.RAW and ch.key is not None and self.vm.state == "running":
                    body = bytes(body)  # the guest writes on: MAC exactly what is sent
                ch.send(T.MEM, MEM_HEADER.pack(first + s, k, enc), body)
                sent += k
                st.pages_sent += k
                st.bytes_sent = ch.bytes_sent
                self._limit(len(body))
            for s, k in zero_runs:
                if round_no > 0:  # a page that became zero must be zeroed over there
                    ch.send(T.MEM, MEM_HEADER.pack(first + s, k, Enc.ZERO))
                st.zero_pages += k
        ch.send_json(T.ROUND, {"round": round_no, "pages": sent, "paused": self._paused_by_us})
        st.rounds = round_no + 1
        dt = time.perf_counter() - t0
        st.pages_per_round.append(sent)
        st.ms_per_round.append(round(dt * 1e3, 1))
        if sent >= self.RATE_MIN_PAGES and dt > 0:  # guest bytes per second, compressed or not
            rate = sent * PAGE / dt
            self._rate = rate if not self._rate else 0.5 * self._rate + 0.5 * rate
        st.bytes_sent = ch.bytes_sent

    def _limit(self, nbytes: int) -> None:
        """Bandwidth cap: sleep so the average rate stays under opts.bandwidth."""
        cap = self.opts.bandwidth
        if cap <= 0:
            return
        now = time.perf_counter()
        if not self._budget_t:
            self._budget_t = now
        self._budget_bytes += nbytes
        ahead = self._budget_bytes / cap - (now - self._budget_t)
        if ahead > 0:
            time.sleep(ahead)
