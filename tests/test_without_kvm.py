"""The tests that need no KVM run anywhere; the ones that do fail, never skip, without it.
Checked here by running both kinds in a mount namespace where /dev/kvm is /dev/null."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

# These hide a real /dev/kvm in a mount namespace: they need root and a host that has one
# (as CI does), so they belong with the KVM tests, not the ones that run anywhere.
pytestmark = pytest.mark.kvm

HIDE_KVM = "mount --bind /dev/null /dev/kvm && exec \"$@\""


def without_kvm(*pytest_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "-m", "sh", "-c", HIDE_KVM, "sh", sys.executable, "-m",
                           "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYHYVE_KVM_DEVICE": ""})


def test_pure_tests_pass_without_kvm():
    p = without_kvm("-m", "not kvm")
    assert p.returncode == 0, p.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", p.stdout).group(1))
    assert passed >= 40 and " skipped" not in p.stdout, p.stdout[-500:]


def test_kvm_tests_fail_rather_than_skip_without_kvm():
    p = without_kvm("tests/test_dirty.py::test_vmm_writes_are_merged_in")
    assert p.returncode != 0 and "needs KVM" in p.stdout and "skipped" not in p.stdout, p.stdout
