"""The destination side: listen, authenticate, check compatibility, receive memory and
state into an unstarted VM, start it, and tell the source. Until RUNNING is sent the
destination owns nothing the source needs: any failure frees the VM and exits with the
reason, and the source resumes its guest.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..description import CONSOLE_ID
from ..devices.console import Console
from ..errors import MigrationDestFailed, PyhyveError, RecordError
from ..machine.memory import PAGE
from ..machine.uffd import PageServer
from ..machine.vcpu import install_kick_handler
from ..pipeline.build import HostFacts, apply_state, build_vm, check_host
from ..pipeline.pages import decode_runs
from ..pipeline.record import MAX_CPUS, MachineSpec
from ..pipeline.sections import check_device_list
from ..vm import VirtualMachine
from .encoding import COMPRESSIONS, Decoder
from .listen import HANDSHAKE_TIMEOUT, Listener, listen_address
from .postcopy import PostcopyDest, runs_mask, valid_session
from .protocol import MAX_PAGES_PER_FRAME, MEM_HEADER, PROTOCOL_VERSION, Channel, Enc, Frame, ProtocolError, T

MAX_STATE_SECTIONS = 4 * MAX_CPUS + 64
PREFAULT_WAIT_S = 3.0  # at most, once: the source waits 60 s while its guest runs


class ReceiveError(MigrationDestFailed, RuntimeError):
    pass


# what ends one attempt but not the wait: the peer, the stream or this host said no
RETRYABLE = (ConnectionError, PyhyveError, ValueError, OSError)


@dataclass
class ReceiveOptions:
    console: str | None = None     # com1's backend (None: --bind, --reuse-paths or stdout)
    tls_dir: str | None = None
    bindings: dict[str, str] = field(default_factory=dict)  # --bind ID=SPEC
    reuse_paths: bool = False      # reopen the backends the source recorded
    io_timeout: float = 60.0       # once authenticated: no progress for this long fails
    receive_timeout: float = 600.0  # wait this long in all for a migration to arrive
    hugepages: bool = False        # guest RAM from the host's reserved 2 MiB pages


def spec_from_hello(hello: dict[str, Any], name: str, bindings: dict[str, str],
                    reuse_paths: bool = False) -> MachineSpec:
    """The source's description of the VM, checked like a snapshot's (nothing in it is
    trusted unchecked), with backends bound here by our rules."""
    if hello.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"bad HELLO: protocol version {hello.get('protocol')!r}, this "
                            f"pyhyve speaks {PROTOCOL_VERSION}")
    try:
        spec = MachineSpec.from_record(hello, name, bindings, reuse_paths)
    except RecordError as e:
        raise ProtocolError(f"bad HELLO: {e}") from None
    if hello.get("compress") not in COMPRESSIONS:
        raise ProtocolError("bad HELLO: compression")
    return spec


class Receiver:
    """Waits for one successful migration. Failed peers and failed attempts (refused,
    cancelled, cut) are dropped and counted, and the wait goes on until a guest runs here,
    `receive_timeout` passes, or close() is called."""

    def __init__(self, name: str, host: str, port: int, key: bytes | None,
                 opts: ReceiveOptions, console: Console | None = None) -> None:
        self.name, self.key, self.opts = name, key, opts
        self.console = console
        install_kick_handler()  # the VM may be built on another thread
        self.vm: VirtualMachine | None = None
        self.ch: Channel | None = None
        self.host_facts = HostFacts.probe()  # before listening: no such work once a peer waits
        sock = listen_address(host, port)
        self.port = sock.getsockname()[1]
        self.listener = Listener(sock, key, opts.tls_dir, say)
        self.pages = 0
        self.rounds = 0
        self.done = False
        self._prefaulter: threading.Thread | None = None
        self._prefault_awaited = False
        self.t_first = 0.0
        self.session = ""                      # the source's post-copy session, if any
        self._postcopy_runs: bytes | None = None
        self.postcopy: PostcopyDest | None = None  # running after the switch
        self._server: PageServer | None = None
        self.not_started: set[str] = set()  # post-copy sessions abandoned before GO

    @property
    def failures(self) -> list[str]:
        return self.listener.failures

    @property
    def bytes_received(self) -> int:
        return self.ch.bytes_received if self.ch else 0

    def close(self) -> None:
        if self.postcopy is None:  # else the post-copy thread keeps it for a reconnection
            self.listener.close()
        if self.ch:
            self.ch.close()

    def receive(self) -> VirtualMachine:
        """Wait for a migration; returns the running VM, or raises ReceiveError at the
        deadline or on close(), having freed all."""
        deadline = time.monotonic() + self.opts.receive_timeout
        try:
            while True:
                got = self.listener.next(deadline)
                if got is None:
                    if self.listener.closed:
                        raise ReceiveError("stopped waiting for a migration")
                    raise ReceiveError(f"no migration arrived within "
                                       f"{self.opts.receive_timeout:.0f} s")
                self.ch, peer = got
                try:
                    return self._receive(self.ch)
                except RETRYABLE as e:
                    self._abandon(e)
                    self.listener.failed(peer, f"migration failed: {e}")
        except BaseException as e:
            self._abandon(e)
            raise
        finally:
            gc.enable()
            self._stop_prefault()
            self.close()

    def _abandon(self, e: BaseException) -> None:
        """Free what a failed attempt built and tell its source why."""
        gc.enable()
        self._stop_prefault()
        if self.ch is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ch.send_json(T.ERROR, {"reason": f"destination: {e}"})
            self.ch.close()
            self.ch = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self.pages = self.rounds = 0
        self.done = False
        if self.session:  # its source may ask to RESUME it: never started, it will hear
            self.not_started.add(self.session)
        self.session, self._postcopy_runs = "", None
        if self._server is not None:
            self._server.close()
            self._server = None

    def _receive(self, ch: Channel) -> VirtualMachine:
        spec, paused = self._handshake(ch)
        # ACCEPT first, then build the VM while the source starts sending (its frames wait
        # in the socket); a failure from here on is an ERROR, and the source resumes.
        # post-copy places pages 4 KiB at a time: not into hugetlb memory
        ch.send_json(T.ACCEPT, {"postcopy": not self.opts.hugepages})
        self.t_first = time.perf_counter()
        if self.opts.hugepages:
            spec = replace(spec, config=replace(spec.config, hugepages=True))
        self.vm = vm = build_vm(spec, self.console, host=self.host_facts)
        blobs, devices = self._stream(ch, vm)
        apply_state(vm, blobs, devices)
        self._stop_prefault()
        server = self._page_server(vm)
        # the hand-over: the guest starts here only once the source has given it up (GO),
        # so a connection lost before GO can never leave it running on both hosts
        ch.send_json(T.READY, {})
        ch.recv(T.GO)
        self.vm = None  # ours from GO on, whatever happens to the connection
        if server is None:
            vm.start(paused=paused)  # the source guest was paused: so is ours
            vm.announce()
        try:
            ch.send_json(T.RUNNING, {})
        except ProtocolError as e:  # the source will say the hand-over is unconfirmed
            say(f"{self.name}: the guest runs here, but the source was not told so ({e})")
        if server is not None:  # the rest of its memory follows on the post-copy thread,
            self.postcopy = PostcopyDest(server, ch, self.listener,  # which owns the
                                         self.session, self.opts.io_timeout, say)  # channel
            self.ch = None                                   # and the listener from here
            self._server = None
            # serving before the guest and its devices start: a paused start quiesces the
            # devices, which may be waiting on pages still on the source
            self.postcopy.start()
            vm.start(paused=paused)
            vm.announce()
        return vm

    def _page_server(self, vm: VirtualMachine) -> PageServer | None:
        """Post-copy: the pages still on the source become missing here, served on first
        touch (before GO, so a failure still leaves the source its guest)."""
        if self._postcopy_runs is None:
            return None
        if not self.session or self.opts.hugepages:
            raise ProtocolError("POSTCOPY without a post-copy session in HELLO, or onto "
                                "--hugepages")
        pending = runs_mask(self._postcopy_runs, vm.memory.size // PAGE)
        if self.ch is not None:  # from here on nothing is received straight into RAM
            self.ch.mem_sink = None
        self._server = server = PageServer(vm.memory, pending)
        server.drop_missing()
        vm.postcopy_left = lambda: server.left  # no save or migration until all is in
        vm.postcopy_abort = server.abort
        return server

    def _handshake(self, ch: Channel) -> tuple[MachineSpec, bool]:
        """HELLO and every check on it, before ACCEPT: nothing of the guest moves unless it
        can run here. A refusal is sent to the source with its reason."""
        # a real source sends HELLO at once: an (--insecure) peer that does not gets the
        # handshake's deadline, not the 60 s a running migration may need
        ch.sock.settimeout(HANDSHAKE_TIMEOUT)
        first = ch.recv(T.HELLO, T.RESUME)
        if first.type == T.RESUME:  # a post-copy source whose GO may not have arrived
            session = first.json(max_depth=1).get("session")
            started = not (isinstance(session, str) and session in self.not_started)
            ch.send_json(T.REFUSE, {"reason": "no such post-copy migration here" if started
                                    else "the guest never started here: it is the source's",
                                    "not_started": None if started else session})
            raise ReceiveError("a post-copy source asked to resume a migration that did not "
                               "start here")
        hello = first.json()
        ch.sock.settimeout(self.opts.io_timeout)
        try:
            binds = dict(self.opts.bindings)
            if self.opts.console is not None:
                binds.setdefault(CONSOLE_ID, self.opts.console)  # --console is com1's --bind
            spec = spec_from_hello(hello, self.name, binds, self.opts.reuse_paths)
            check_host(spec, self.host_facts)
            session = hello.get("postcopy")
            if session is not None and not valid_session(session):
                raise ProtocolError("bad HELLO: post-copy session")
            self.session = session or ""
            if self.session:  # numpy (~80 ms to import) now, not while the guest waits
                import numpy  # noqa: F401
        except (ProtocolError, RecordError) as e:
            ch.send_json(T.REFUSE, {"reason": str(e)})
            raise ReceiveError(f"refused the migration: {e}") from None
        return spec, hello.get("paused") is True

    def _stream(self, ch: Channel, vm: VirtualMachine) -> tuple[dict[str, bytes], list[Any]]:
        """Memory frames into guest RAM, state sections kept, until COMPLETE."""
        total_pages = vm.memory.size // PAGE
        ch.mem_sink = lambda first, count, enc, n: self._sink(first, count, enc, n, total_pages)
        blobs: dict[str, bytes] = {}
        decompress = Decoder()
        while True:
            f = ch.recv(T.MEM, T.ROUND, T.STATE, T.COMPLETE, T.RUNS, T.POSTCOPY)
            if f.type == T.MEM:
                self._memory(f, total_pages, decompress)
            elif f.type == T.RUNS:
                if self._prefaulter is not None:
                    raise ProtocolError("a second RUNS frame")
                self._prefault(bytes(f.payload), total_pages)
            elif f.type == T.POSTCOPY:
                if self._postcopy_runs is not None:
                    raise ProtocolError("a second POSTCOPY frame")
                self._postcopy_runs = bytes(f.payload)
            elif f.type == T.ROUND:
                self.rounds += 1
                self._await_prefault(f)
                ch.send(T.ROUND, bytes(f.payload))  # caught up to here: the source may stop
            elif f.type == T.STATE:
                gc.disable()  # the source is paused from here on: no collector pauses
                name, blob = self._state(f)
                if name in blobs or len(blobs) >= MAX_STATE_SECTIONS:
                    raise ProtocolError(f"unexpected state section '{name}'")
                blobs[name] = blob
            else:
                try:
                    return blobs, check_device_list(f.json().get("devices"))
                except RecordError:
                    raise ProtocolError("malformed COMPLETE frame") from None

    def _prefault(self, raw: bytes, total_pages: int) -> None:
        """Fault in the announced pages on another thread, ahead of their data."""
        try:
            runs = decode_runs(raw, total_pages)
        except ValueError:
            raise ProtocolError("malformed RUNS frame") from None
        mem = self.vm.memory  # type: ignore[union-attr]

        def work() -> None:
            for page, count in runs:
                for off, n in mem.pieces(page * PAGE, (page + count) * PAGE, 2 << 20):
                    if self.done:
                        return
                    mem.populate(off, n)
        self._prefaulter = threading.Thread(target=work, name="prefault", daemon=True)
        self._prefaulter.start()

    def _await_prefault(self, f: Frame) -> None:
        """The first ROUND of a running source is acknowledged once the announced pages are
        faulted in (bounded), so the pages sent in its pause land in memory already there.
        Never while the source's guest waits (a warm migration, the last round)."""
        if self._prefaulter is None or self._prefault_awaited:
            return
        self._prefault_awaited = True
        if f.json(max_depth=1).get("paused") is not True:
            self._prefaulter.join(PREFAULT_WAIT_S)

    def _stop_prefault(self) -> None:
        """The prefault thread must be gone before guest memory can be unmapped."""
        self.done = True
        if self._prefaulter is not None:
            self._prefaulter.join()
            self._prefaulter = None

    def _sink(self, first: int, count: int, enc: int, n: int, total_pages: int) -> memoryview | None:
        """Raw pages go straight from the socket into guest memory (the MAC is checked
        after; a bad one aborts the migration before the guest could run)."""
        if enc != Enc.RAW or not 0 < count <= MAX_PAGES_PER_FRAME or n != count * PAGE \
                or first + count > total_pages:
            return None  # the ordinary path validates and reports it
        try:
            return self.vm.memory.file_view(first * PAGE, n)  # type: ignore[union-attr]
        except ValueError:
            return None  # crosses a region edge

    def _memory(self, f: Frame, total_pages: int, decoder: Decoder) -> None:
        if len(f.payload) < MEM_HEADER.size:
            raise ProtocolError("short MEM frame")
        first, count, enc = MEM_HEADER.unpack_from(f.payload)
        if f.direct:
            self.pages += count
            return
        body = memoryview(f.payload)[MEM_HEADER.size:]
        if not 0 < count <= MAX_PAGES_PER_FRAME or first + count > total_pages:
            raise ProtocolError("MEM frame outside guest memory")
        size = count * PAGE
        mem = self.vm.memory  # type: ignore[union-attr]
        start = first * PAGE
        pieces = list(mem.pieces(start, start + size, size))
        if len(pieces) == 1:  # in one region: decoded where it belongs
            decoder.into(enc, body, mem.file_address(start, size), size)
            self.pages += count
            return
        data = decoder.decode(enc, body, size)
        for off, n in pieces:
            dst = mem.file_view(off, n)
            if data is None:
                dst[:] = bytes(n)
            else:
                dst[:] = data[off - start:off - start + n]
        self.pages += count

    @staticmethod
    def _state(f: Frame) -> tuple[str, bytes]:
        p = bytes(f.payload)
        if len(p) < 2:
            raise ProtocolError("short STATE frame")
        n = int.from_bytes(p[:2], "little")
        if n == 0 or 2 + n > len(p):
            raise ProtocolError("malformed STATE frame")
        try:
            name = p[2:2 + n].decode()
        except UnicodeDecodeError:
            raise ProtocolError("malformed STATE frame name") from None
        return name, p[2 + n:]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
