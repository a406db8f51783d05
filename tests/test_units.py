"""Pieces that need no KVM: untrusted input readers, socket path claiming, the snapshot
commit and its leftovers, address parsing, status formatting, the console escape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyhyve import unixsock, untrusted
from pyhyve.cli.ctl import format_status, human
from pyhyve.devices.console import StdioConsole
from pyhyve.migration.source import MigrationError, Stats, parse_listen, parse_target
from pyhyve.snapshot import files

# --- untrusted bytes and files ---------------------------------------------------------

@pytest.mark.parametrize("raw,needle", [
    (b"[" * 5000 + b"]" * 5000, "nested"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not acceptable"),
    (b"\xff\xfe\xfd", "UTF-8|JSON"),
    (b'{"a": [[[[[[1]]]]]]}', "deeper than 4"),
    (b"{", "not valid JSON"),
])
def test_untrusted_json_is_refused_in_one_error(raw, needle):
    with pytest.raises(untrusted.BadJson, match=needle):
        untrusted.loads(raw, max_depth=4)


def test_untrusted_json_within_bounds():
    assert untrusted.loads(b'{"a": [1, {"b": 2}]}', max_depth=3) == {"a": [1, {"b": 2}]}


def test_read_file_refuses_what_is_not_a_bounded_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100)
    for path, needle in ((str(fifo), "not a regular file"), ("/dev/zero", "not a regular file"),
                         (str(tmp_path), "not a regular file"), (str(big), "more than"),
                         (str(tmp_path / "none"), "does not exist")):
        with pytest.raises(untrusted.BadFile, match=needle):
            untrusted.read_file(path, 50, "kernel")
    assert untrusted.read_file(str(big), 100) == b"x" * 100


# --- socket paths ----------------------------------------------------------------------

def test_claim_refuses_files_and_live_sockets_and_removes_stale_ones(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(unixsock.SocketPathError, match="not a socket"):
        unixsock.claim(str(f))
    assert f.read_text() == "keep"
    live, ident = unixsock.listen(str(tmp_path / "live"), 1)
    with pytest.raises(unixsock.SocketPathError, match="in use"):
        unixsock.claim(str(tmp_path / "live"))
    assert os.stat(tmp_path / "live").st_mode & 0o777 == 0o600
    live.close()  # now stale: nobody accepts on it
    unixsock.claim(str(tmp_path / "live"))
    assert not (tmp_path / "live").exists()
    with pytest.raises(unixsock.SocketPathError, match="longer than"):
        unixsock.claim("/tmp/" + "x" * 200)
    s, ident = unixsock.listen(str(tmp_path / "mine"), 1)
    s.close()
    os.unlink(tmp_path / "mine")
    (tmp_path / "mine").write_text("someone else's now")
    unixsock.release(str(tmp_path / "mine"), ident)  # not our socket any more: kept
    assert (tmp_path / "mine").read_text() == "someone else's now"


# --- the snapshot commit, without a VM ----------------------------------------------------

def temps(base: str) -> tuple[str, str]:
    out = []
    for suffix in (".mem", ".kern"):
        fd, path = files.create_temp(base, suffix)
        os.write(fd, b"data" + suffix.encode())
        os.close(fd)
        out.append(path)
    return out[0], out[1]


def meta_of(gen_files: files.SnapshotFiles) -> bytes:
    return json.dumps({"format_version": 2, "generation": gen_files.generation}).encode()


def test_commit_makes_a_new_generation_and_removes_the_old(tmp_path):
    base = str(tmp_path / "s")
    f1, removed = files.commit(base, *temps(base), meta_of)
    assert f1.generation == 1 and removed == []
    assert os.stat(f1.memory).st_mode & 0o777 == 0o600
    f2, removed = files.commit(base, *temps(base), meta_of)
    assert f2.generation == 2 and sorted(removed) == [f1.memory, f1.state]
    assert sorted(os.listdir(tmp_path)) == ["s.g2", "s.g2.kern", "s.meta"]
    assert files.current_files(base) == f2


def test_leftovers_are_dead_temporaries_and_unnamed_generations_only(tmp_path):
    base = str(tmp_path / "s")
    files.commit(base, *temps(base), meta_of)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"s.tmp-{dead}-abc.mem").write_text("x")            # a dead save's
    (tmp_path / f"s.tmp-{os.getpid()}-abc.mem").write_text("x")     # a live save's
    (tmp_path / "s.g7").write_text("x")                              # no metadata names it
    for name in ("s.g5", "s.g5.kern", "s.g5.meta"):                  # snapshot "s.g5" itself
        (tmp_path / name).write_text("x")
    gone = sorted(os.path.basename(p) for p in files.clean(base))
    assert gone == sorted([f"s.tmp-{dead}-abc.mem", "s.g7"])
    assert (tmp_path / f"s.tmp-{os.getpid()}-abc.mem").exists() and (tmp_path / "s.g5").exists()


def test_resolve_base_from_any_name(tmp_path):
    base = str(tmp_path / "s")
    files.commit(base, *temps(base), meta_of)
    for name in ("s", "s.meta", "s.g1", "s.g1.kern", "s.kern"):
        assert files.resolve_base(str(tmp_path / name)) == base
    (tmp_path / "s.g1.meta").write_text("{}")  # a snapshot named s.g1 is itself
    assert files.resolve_base(str(tmp_path / "s.g1")) == str(tmp_path / "s.g1")


def test_planted_generation_names_are_stepped_over(tmp_path):
    base = str(tmp_path / "s")
    os.symlink("/etc/hostname", tmp_path / "s.g1")
    f, _ = files.commit(base, *temps(base), meta_of)
    assert f.generation == 2 and os.path.islink(tmp_path / "s.g1")


# --- addresses, status lines, the console escape -----------------------------------------

@pytest.mark.parametrize("text,want", [
    ("7797", ("", 7797)), ("*:7797", ("", 7797)), ("[::]:7797", ("::", 7797)),
    ("10.0.0.1,7797", ("10.0.0.1", 7797)), ("host", ("host", 7797)),
    ("[fe80::1]:99", ("fe80::1", 99)),
])
def test_parse_listen(text, want):
    assert parse_listen(text, 7797) == want


@pytest.mark.parametrize("text", ["host:0", "host:70000", ":1", "host:x", "99999"])
def test_bad_addresses(text):
    with pytest.raises(MigrationError):
        parse_listen(text, 7797) if text.isdigit() else parse_target(text, 7797)


def test_status_is_human():
    assert human(512 << 20) == "512 MiB" and human(3 << 29) == "1.5 GiB" and human(10) == "10 B"
    out = format_status({"name": "v", "memory": 1 << 30, "stop_reason": "", "x": None})
    assert out == "name: v\nmemory: 1 GiB"


def test_missed_downtime_target_in_the_stats_line():
    st = Stats(state="completed", downtime_s=0.012, downtime_target_ms=5, target="h:1")
    assert st.target_missed and "missed the 5 ms target" in st.line()
    assert not Stats(state="completed", downtime_s=0.001, downtime_target_ms=5).target_missed


def test_console_escape_sequences():
    con = StdioConsole(read_stdin=False)
    quits = []
    con.on_quit = lambda: quits.append(1)
    assert con.filter(b"ab\x01\x01c") == b"ab\x01c"      # Ctrl-A Ctrl-A sends one Ctrl-A
    assert con.filter(b"\x03x\x01") == b"\x03x"          # Ctrl-C goes through; escape pending
    assert con.filter(b"x") == b"" and quits == [1]      # ... split across two reads
    assert con.filter(b"\x01z") == b""                   # unknown: swallowed
    con.close()


# --- one error tree: user errors are one line, bugs are said to be bugs ---------------------

def test_every_user_facing_error_is_a_pyhyve_error():
    from pyhyve.boot.common import BootError
    from pyhyve.control.client import ClientError
    from pyhyve.errors import (
        BootFailed,
        ControlFailed,
        MigrationDestFailed,
        MigrationSourceFailed,
        PyhyveError,
        RecordError,
        SnapshotLoadFailed,
    )
    from pyhyve.kvm import KvmError
    from pyhyve.migration.dest import ReceiveError
    from pyhyve.migration.protocol import PeerError, ProtocolError
    from pyhyve.migration.security import SecurityError
    from pyhyve.pipeline.codec import StateError
    from pyhyve.snapshot.format import SnapshotError
    from pyhyve.vm import VmError
    for cls, phase in ((BootError, BootFailed), (VmError, BootFailed),
                       (SnapshotError, SnapshotLoadFailed), (StateError, RecordError),
                       (MigrationError, MigrationSourceFailed),
                       (ReceiveError, MigrationDestFailed), (ClientError, ControlFailed),
                       (KvmError, PyhyveError), (ProtocolError, PyhyveError),
                       (PeerError, PyhyveError), (SecurityError, PyhyveError),
                       (untrusted.BadJson, PyhyveError), (unixsock.SocketPathError, PyhyveError)):
        assert issubclass(cls, phase) and issubclass(cls, PyhyveError), cls


def test_a_bug_is_an_internal_error_not_a_one_liner(monkeypatch, capsys):
    from pyhyve.cli import main as cli_main

    def bug(_args):
        raise TypeError("'NoneType' object is not subscriptable")
    monkeypatch.setattr(cli_main, "cmd_certs", bug)
    assert cli_main.main(["migration-certs", "/nonexistent/x"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error (a bug in pyhyve" in err


def test_a_handler_bug_is_reported_as_such_and_the_server_goes_on(capsys):
    from pyhyve.control.server import ControlServer

    srv = ControlServer.__new__(ControlServer)
    srv.handlers = {"boom": lambda m: 1 / 0, "fine": lambda m: {"x": 1}}
    reply = ControlServer.dispatch(srv, {"cmd": "boom"})
    assert reply["ok"] is False and reply["error"].startswith("internal error")
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert ControlServer.dispatch(srv, {"cmd": "fine"}) == {"ok": True, "x": 1}
