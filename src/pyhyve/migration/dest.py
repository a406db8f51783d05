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
from dataclasses import dataclass, field

import lz4.block
import zstandard

from ..description import CONSOLE_ID, DescriptionError, bind
from ..devices.console import Console
from ..errors import MigrationDestFailed
from ..kvm import ioctls as I
from ..machine.cpuid import CpuidError, cpuid_from_list
from ..machine.memory import PAGE, ram_layout
from ..machine.vcpu import install_kick_handler
from ..snapshot.format import MAX_CPUS, MAX_MEMORY, SnapshotError
from ..snapshot.restore import check_host, decode_state, recorded_description
from ..vm import VirtualMachine, VmConfig, VmError, host_memory_bytes
from .listen import HANDSHAKE_TIMEOUT, Listener, listen_address
from .protocol import MAX_PAGES_PER_FRAME, MEM_HEADER, PROTOCOL_VERSION, Channel, Enc, Frame, ProtocolError, T

MAX_STATE_SECTIONS = 4 * MAX_CPUS + 64


class ReceiveError(MigrationDestFailed, RuntimeError):
    pass


# what ends one attempt but not the wait: the peer, the stream or this host said no
RETRYABLE = (ConnectionError, ReceiveError, SnapshotError, CpuidError, VmError, ValueError,
             OSError)


@dataclass
class ReceiveOptions:
    console: str | None = None     # com1's backend (None: --bind, --reuse-paths or stdout)
    tls_dir: str | None = None
    bindings: dict[str, str] = field(default_factory=dict)  # --bind ID=SPEC
    reuse_paths: bool = False      # reopen the backends the source recorded
    io_timeout: float = 60.0       # once authenticated: no progress for this long fails
    receive_timeout: float = 600.0  # wait this long in all for a migration to arrive


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(f"bad HELLO: {what}")


def config_from_hello(hello: dict, name: str, bindings: dict[str, str],
                      reuse_paths: bool = False) -> VmConfig:
    """Validate the source's description of the VM; nothing in it is trusted unchecked."""
    _need(hello.get("protocol") == PROTOCOL_VERSION,
          f"protocol version {hello.get('protocol')!r}, this pyhyve speaks {PROTOCOL_VERSION}")
    vm = hello.get("vm")
    _need(isinstance(vm, dict), "no VM config")
    mem, cpus = vm.get("memory"), vm.get("cpus")
    _need(isinstance(mem, int) and 0 < mem <= MAX_MEMORY and mem % PAGE == 0, "memory size")
    _need(isinstance(cpus, int) and 1 <= cpus <= MAX_CPUS, "vCPU count")
    for k in ("cmdline", "name"):
        _need(isinstance(vm.get(k), str), k)
    hidden = vm.get("cpuid_hidden")
    _need(isinstance(hidden, list) and all(isinstance(h, str) for h in hidden), "cpuid_hidden")
    m = hello.get("memory")
    want = [{"guest_phys_addr": r.guest_phys_addr, "size": r.size, "file_offset": r.file_offset}
            for r in ram_layout(mem)]
    _need(isinstance(m, dict) and m.get("size") == mem and m.get("regions") == want,
          "memory layout")
    _need(hello.get("compress") in ("auto", "none", "zstd", "lz4"), "compression")
    _need(isinstance(hello.get("cpuid"), list) and len(hello["cpuid"]) <= 4096, "cpuid")
    host = hello.get("host")
    _need(isinstance(host, dict) and isinstance(host.get("tsc_khz"), int), "host facts")
    try:  # the machine the source describes, with backends bound here, by our rules
        machine = bind(recorded_description(hello), bindings, reuse_paths)
    except DescriptionError as e:
        raise ProtocolError(f"bad HELLO: {e}") from None
    com1 = machine.device(CONSOLE_ID)
    return VmConfig(name=name, memory=mem, cpus=cpus, kernel=vm.get("kernel") if isinstance(
        vm.get("kernel"), str) else None, cmdline=vm["cmdline"],
        console=com1.backend if com1 and com1.backend else "null",
        cpuid_hidden=tuple(hidden), description=machine)


def probe_host() -> tuple[list, int, bool]:
    """What compatibility checks need of this host: KVM's CPUID, TSC kHz, TSC scaling."""
    from ..vm import open_kvm

    kvm = open_kvm()
    try:
        vm = kvm.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                return (kvm.supported_cpuid(), vcpu.get_tsc_khz(),
                        bool(kvm.check_extension(I.KVM_CAP_TSC_CONTROL)))
            finally:
                vcpu.close()
        finally:
            vm.close()
    finally:
        kvm.close()


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
        self.host_facts = probe_host()  # before listening: no such work once a peer waits
        sock = listen_address(host, port)
        self.port = sock.getsockname()[1]
        self.listener = Listener(sock, key, opts.tls_dir, say)
        self.pages = 0
        self.rounds = 0
        self.done = False
        self._prefaulter: threading.Thread | None = None
        self.t_first = 0.0

    @property
    def failures(self) -> list[str]:
        return self.listener.failures

    @property
    def bytes_received(self) -> int:
        return self.ch.bytes_received if self.ch else 0

    def close(self) -> None:
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

    def _receive(self, ch: Channel) -> VirtualMachine:
        # a real source sends HELLO at once: an (--insecure) peer that does not gets the
        # handshake's deadline, not the 60 s a running migration may need
        ch.sock.settimeout(HANDSHAKE_TIMEOUT)
        hello = ch.recv(T.HELLO).json()
        ch.sock.settimeout(self.opts.io_timeout)
        try:  # every check before ACCEPT: nothing of the guest moves unless it can run here
            binds = dict(self.opts.bindings)
            if self.opts.console is not None:
                binds.setdefault(CONSOLE_ID, self.opts.console)  # --console is com1's --bind
            config = config_from_hello(hello, self.name, binds, self.opts.reuse_paths)
            host = host_memory_bytes()
            if host and config.memory > host:
                raise ReceiveError(f"the guest needs {config.memory >> 20} MiB; this host has "
                                   f"{host >> 20} MiB")
            cpuid = cpuid_from_list(hello["cpuid"])
            supported, tsc_khz, tsc_control = self.host_facts
            scale = check_host(hello["cpuid"], hello["host"]["tsc_khz"], supported, tsc_khz,
                               tsc_control)
        except (ProtocolError, ReceiveError, SnapshotError, CpuidError) as e:
            ch.send_json(T.REFUSE, {"reason": str(e)})
            raise ReceiveError(f"refused the migration: {e}") from None
        paused = hello.get("paused") is True  # the source guest was paused: so is ours
        # ACCEPT first, then build the VM while the source starts sending (its frames wait
        # in the socket); a failure from here on is an ERROR, and the source resumes.
        ch.send_json(T.ACCEPT, {})
        self.t_first = time.perf_counter()
        self.vm = vm = VirtualMachine(config, self.console, cpuid=cpuid)
        if scale:
            vm.set_tsc_khz(hello["host"]["tsc_khz"])
        total_pages = vm.memory.size // PAGE
        ch.mem_sink = lambda first, count, enc, n: self._sink(first, count, enc, n, total_pages)
        blobs: dict[str, bytes] = {}
        decompress = zstandard.ZstdDecompressor()
        while True:
            f = ch.recv(T.MEM, T.ROUND, T.STATE, T.COMPLETE, T.RUNS)
            if f.type == T.MEM:
                self._memory(f, total_pages, decompress)
            elif f.type == T.RUNS:
                self._prefault(bytes(f.payload), total_pages)
            elif f.type == T.ROUND:
                self.rounds += 1
                ch.send(T.ROUND, bytes(f.payload))  # caught up to here: the source may stop
            elif f.type == T.STATE:
                gc.disable()  # the source is paused from here on: no collector pauses
                name, blob = self._state(f)
                if name in blobs or len(blobs) >= MAX_STATE_SECTIONS:
                    raise ProtocolError(f"unexpected state section '{name}'")
                blobs[name] = blob
            else:
                devices = f.json().get("devices")
                if not isinstance(devices, list) or not all(
                        isinstance(d, dict) and isinstance(d.get("name"), str)
                        and isinstance(d.get("kind"), str) for d in devices):
                    raise ProtocolError("malformed COMPLETE frame")
                state = decode_state(blobs, config.cpus, devices, vm.device_classes())
                vm.apply(state)  # type: ignore[arg-type]
                self._stop_prefault()
                vm.start(paused=paused)
                ch.send_json(T.RUNNING, {})
                self.vm = None  # the caller owns it now
                return vm

    def _prefault(self, raw: bytes, total_pages: int) -> None:
        """Fault in the announced pages on another thread, ahead of their data."""
        from ..snapshot.memfile import decode_runs
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

    def _memory(self, f: Frame, total_pages: int, zd: zstandard.ZstdDecompressor) -> None:
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
        if enc == Enc.RAW:
            data = body
        elif enc == Enc.ZSTD:
            try:
                data = memoryview(zd.decompress(body, max_output_size=size))
            except zstandard.ZstdError:
                raise ProtocolError("corrupt zstd data in MEM frame") from None
        elif enc == Enc.LZ4:
            try:
                data = memoryview(lz4.block.decompress(body, uncompressed_size=size))
            except (lz4.block.LZ4BlockError, ValueError):
                raise ProtocolError("corrupt lz4 data in MEM frame") from None
        elif enc == Enc.ZERO:
            if len(body):
                raise ProtocolError("ZERO MEM frame carries data")
            data = None
        else:
            raise ProtocolError(f"unknown MEM encoding {enc}")
        if data is not None and len(data) != size:
            raise ProtocolError("MEM frame length does not match its page count")
        mem = self.vm.memory  # type: ignore[union-attr]
        start = first * PAGE
        for off, n in mem.pieces(start, start + size, size):
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
