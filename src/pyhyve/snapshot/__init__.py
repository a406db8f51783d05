"""Snapshots: the three files (memory, state, metadata), save, verify and restore."""
