"""Shared fixtures: the built guest kit, VMs with a captured console, CLI runners."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from pyhyve import guestkit
from pyhyve.devices.console import MemoryConsole
from pyhyve.vm import VirtualMachine, VmConfig

REPO = guestkit.REPO
BIN = os.path.dirname(sys.executable)
# PYHYVE_TEST_HUGEPAGES=1: the suites run with guest RAM in the host's reserved 2 MiB pages
# (boots, eager restores, migration destinations; scripts/test runs the snapshot and
# migration suites so)
HUGEPAGES = os.environ.get("PYHYVE_TEST_HUGEPAGES") == "1"
HUGETLB = "hugetlb 2 MiB pages"
HUGE_POOL = 1280  # pages: a 1 GiB guest and its 1 GiB destination, and room to spare
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"

if HUGEPAGES:  # before the test modules import it: eager restores go on huge pages too
    import pyhyve.snapshot.restore as _restore

    _eager_restore = _restore.restore

    @functools.wraps(_eager_restore)
    def _restore_on_huge_pages(*args: object, **kw: object) -> VirtualMachine:
        if not kw.get("lazy", True) and not kw.get("clone", False):
            kw.setdefault("hugepages", True)
        vm = _eager_restore(*args, **kw)  # type: ignore[arg-type]
        if kw.get("hugepages"):
            assert vm.status()["memory_backing"] == HUGETLB, vm.status()["memory_backing"]
        return vm
    _restore.restore = _restore_on_huge_pages  # type: ignore[assignment]


@pytest.fixture(scope="session", autouse=True)
def huge_page_pool() -> Iterator[None]:
    """In huge-page mode, a pool big enough for every test, given back afterwards."""
    if not HUGEPAGES:
        yield
        return
    with open(NR_HUGEPAGES) as f:
        before = int(f.read())
    try:
        with open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1")
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(before + HUGE_POOL))
        with open(NR_HUGEPAGES) as f:
            got = int(f.read())
    except PermissionError:
        pytest.fail(f"huge-page mode sizes {NR_HUGEPAGES}: run the tests as root")
    try:
        assert got == before + HUGE_POOL, f"the host gave {got - before} of {HUGE_POOL}"
        yield
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(before))


@functools.cache
def kvm_problem() -> str | None:
    """Why KVM cannot be used here (None: it can)."""
    from pyhyve.kvm import Kvm

    path = os.environ.get("PYHYVE_KVM_DEVICE") or "/dev/kvm"
    try:
        Kvm(path).close()
    except (OSError, ValueError) as e:
        return f"{path}: {e}"
    return None


@pytest.fixture(autouse=True)
def kvm_required(request: pytest.FixtureRequest) -> None:
    """Tests marked `kvm` fail loudly, never skip, where KVM cannot be used (CI has it);
    the rest (device models, formats, codecs, boot builders) run anywhere:
    `pytest -m "not kvm"`."""
    if request.node.get_closest_marker("kvm") and (why := kvm_problem()):
        pytest.fail(f"this test needs KVM, which is not usable here: {why}", pytrace=False)


class CaptureConsole(MemoryConsole):
    """Guest output in memory, and waits that fail a test with what was printed."""

    def wait_for(self, needle: str | bytes, timeout: float = 20.0, start: int = 0) -> int:
        raw = needle.encode() if isinstance(needle, str) else needle
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                i = self.buf.find(raw, start)
                if i >= 0:
                    return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{needle!r} not seen in {timeout}s; output: "
                                         f"{bytes(self.buf[-400:])!r}")
                self.cond.wait(left)

    def wait_count(self, char: bytes, count: int, timeout: float = 20.0, start: int = 0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.buf.count(char, start) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{count} x {char!r} not seen in {timeout}s")
                self.cond.wait(left)


@pytest.fixture(scope="session")
def kit() -> dict[str, str]:
    return guestkit.build()


@pytest.fixture
def make_vm(kit: dict[str, str]) -> Iterator[Callable[..., tuple[VirtualMachine, CaptureConsole]]]:
    vms: list[VirtualMachine] = []

    def make(guest: str = "ab", cmdline: str = "", memory: int = 64 << 20, cpus: int = 1,
             start: bool = True) -> tuple[VirtualMachine, CaptureConsole]:
        con = CaptureConsole()
        vm = VirtualMachine.create(VmConfig(f"t{len(vms)}", memory, cpus,
                                            kernel=kit.get(guest, guest), cmdline=cmdline,
                                            hugepages=HUGEPAGES),
                                   console=con)
        vms.append(vm)
        if HUGEPAGES:  # never the silent fallback: these runs are about huge pages
            assert vm.status()["memory_backing"] == HUGETLB, vm.status()["memory_backing"]
        if start:
            vm.start()
        return vm, con

    yield make
    for vm in vms:
        vm.close()


def suspended(make_vm, base: str, guest: str = "ab", cmdline: str = "ws=4M",
              memory: int = 32 << 20, ready: bytes = b"BB") -> str:
    """Boot a kit guest, let it print `ready`, suspend it to `base`; returns `base`."""
    from pyhyve.snapshot.save import save

    vm, con = make_vm(guest, cmdline, memory=memory)
    con.wait_for(ready)
    save(vm, base, "suspend")
    vm.stop("suspended")
    return base


@pytest.fixture
def rundir(tmp_path, monkeypatch) -> str:
    d = str(tmp_path / "run")
    monkeypatch.setenv("PYHYVE_RUNDIR", d)
    return d


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `pyhyve` or `pyhyvectl` from this environment's bin directory."""
    return subprocess.run([os.path.join(BIN, args[0]), *args[1:]], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          input=input if input is not None else "")


SPAWNED: list[subprocess.Popen] = []


def spawn(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    p = subprocess.Popen([os.path.join(BIN, args[0]), *args[1:]],
                         env={**os.environ, **(env or {})}, **kw)  # type: ignore[arg-type]
    SPAWNED.append(p)
    return p


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """A test that fails halfway must not leave a VMM running (and eating a core) for the
    rest of the run: whatever it spawned and did not end is killed after it."""
    yield
    while SPAWNED:
        p = SPAWNED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_socket(rundir: str, name: str, timeout: float = 20.0) -> None:
    path = os.path.join(rundir, f"{name}.sock")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"control socket {path} never appeared")
        time.sleep(0.02)


def wait_file(path: object, needle: str, timeout: float = 30.0) -> str:
    """Wait until the text file at `path` contains `needle`; returns its text."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in {path} after {timeout}s: {text[-300:]!r}")
        time.sleep(0.02)


# --- two "hosts": network namespaces joined by a veth pair (migration between them) ---

KEY_TEXT = "correct horse battery staple 42"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, tuple[str, str]]]:
    """Two namespaces, 10.251.<n>.1 and .2, made for this run and removed after it."""
    n = os.getpid() % 200 + 20
    a, b = f"pyhA{os.getpid()}", f"pyhB{os.getpid()}"
    va, vb = f"pva{os.getpid() % 100000}", f"pvb{os.getpid() % 100000}"
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    try:
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vb, "netns", b)
        sh("ip", "-n", a, "addr", "add", f"10.251.{n}.1/24", "dev", va)
        sh("ip", "-n", b, "addr", "add", f"10.251.{n}.2/24", "dev", vb)
        for ns, dev in ((a, va), (b, vb)):
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield {"a": (a, f"10.251.{n}.1"), "b": (b, f"10.251.{n}.2")}
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


@pytest.fixture
def keyfile(tmp_path) -> str:
    p = tmp_path / "migration.key"
    p.write_text(KEY_TEXT)
    p.chmod(0o600)
    return str(p)


def in_ns(ns: str, *args: str, **kw) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, os.path.join(BIN, args[0]), *args[1:]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    SPAWNED.append(p)
    return p
