"""ctypes bindings to the Linux KVM API (x86_64)."""

from .api import Kvm, KvmError, Vcpu, Vm

__all__ = ["Kvm", "KvmError", "Vcpu", "Vm"]
