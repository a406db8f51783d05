"""Guest loaders: PVH ELF kernels and Linux bzImages."""

from .common import BootError, BootInfo

__all__ = ["BootError", "BootInfo"]
