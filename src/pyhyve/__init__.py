"""pyhyve: a virtual machine monitor in Python on Linux KVM, built for save, restore and migration."""

__version__ = "0.1.0"
