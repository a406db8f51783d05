"""The machine: guest memory, CPUID, vCPU threads and their pause/resume handshake."""
