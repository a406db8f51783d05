"""State versioning: stable record names, older records upgraded (functions, then
defaults), newer ones refused with the section and both versions named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from pyhyve.devices.base import DeviceState
from pyhyve.devices.uart import UartState
from pyhyve.machine.state import VcpuState, VmKvmState
from pyhyve.pipeline import codec


@dataclass(frozen=True)
class WidgetV1(DeviceState):
    NAME: ClassVar[str] = "widget"
    VERSION: ClassVar[int] = 1
    speed: int = 0


@dataclass(frozen=True)
class WidgetV3(DeviceState):
    """The same record two versions later: v2 renamed speed to rate (an upgrade function),
    v3 added a queue depth (a default)."""

    NAME: ClassVar[str] = "widget"
    VERSION: ClassVar[int] = 3
    UPGRADES: ClassVar = {1: lambda f: {"rate": f.pop("speed") * 2, **f}}
    rate: int = field(default=0, metadata={"since": 2})
    depth: int = field(default=32, metadata={"since": 3})


def test_an_older_record_is_upgraded_and_defaulted():
    old = codec.encode(WidgetV1(speed=21))
    assert codec.decode(WidgetV3, old, "dev:w0") == WidgetV3(rate=42, depth=32)


def test_a_newer_record_is_refused_naming_section_and_versions():
    new = codec.encode(WidgetV3(rate=1))
    with pytest.raises(codec.StateError, match=r"state section 'dev:w0' is widget version 3; "
                       r"this pyhyve reads widget up to version 1"):
        codec.decode(WidgetV1, new, "dev:w0")


def test_a_current_record_must_have_every_field():
    raw = json.loads(codec.encode(WidgetV3(rate=1)))
    del raw["fields"]["depth"]
    with pytest.raises(codec.StateError, match="missing \\['depth'\\]"):
        codec.decode(WidgetV3, json.dumps(raw).encode(), "dev:w0")
    raw["fields"]["depth"] = 1
    raw["fields"]["evil"] = 1
    with pytest.raises(codec.StateError, match="unexpected \\['evil'\\]"):
        codec.decode(WidgetV3, json.dumps(raw).encode(), "dev:w0")


def test_record_names_are_stable_constants_not_class_names():
    for cls, name in ((VcpuState, "VcpuState"), (VmKvmState, "VmKvmState"),
                      (UartState, "UartState")):
        assert name == cls.NAME  # what snapshots since format 1 carry: never to change
    renamed = type("SomethingElse", (UartState,), {})
    raw = codec.encode(UartState(scr=7))
    assert json.loads(raw)["kind"] == "UartState"
    assert codec.decode(renamed, raw).scr == 7


def test_every_device_state_has_a_name():
    from pyhyve.devices.misc import PostState
    from pyhyve.devices.pci import PciHostState
    for cls in (PostState, PciHostState, UartState):
        assert cls.NAME and cls.VERSION >= 1


def test_an_older_record_must_have_its_own_fields_and_no_newer_ones():
    with pytest.raises(codec.StateError, match=r"missing \['speed'\]|cannot upgrade"):
        codec.decode(WidgetV3, json.dumps({"kind": "widget", "version": 1, "fields": {}}).encode())
    rec = {"kind": "widget", "version": 2, "fields": {"rate": 1, "depth": 4}}
    with pytest.raises(codec.StateError, match="unexpected \\['depth'\\]"):
        codec.decode(WidgetV3, json.dumps(rec).encode())  # depth came only in version 3


def test_a_failing_upgrade_is_a_refusal_not_a_traceback():
    @dataclass(frozen=True)
    class Bad(DeviceState):
        NAME: ClassVar[str] = "bad"
        VERSION: ClassVar[int] = 2
        UPGRADES: ClassVar = {1: lambda f: f["ports"][0]}
        x: int = 0
    for fields in ({"ports": []}, {"ports": [5]}):
        rec = {"kind": "bad", "version": 1, "fields": fields}
        with pytest.raises(codec.StateError, match="upgrad"):
            codec.decode(Bad, json.dumps(rec).encode())
