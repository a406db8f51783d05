"""Command-line front ends: `pyhyve` (run VMs, inspect snapshots) and `pyhyvectl`."""
