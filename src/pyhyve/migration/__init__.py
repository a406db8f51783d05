"""Migration: move a running guest to another pyhyve over TCP, warm or live (pre-copy).

The state that travels is the state a snapshot saves (pyhyve.snapshot): one implementation,
two transports.
"""

DEFAULT_PORT = 7797
