"""Device models: buses, UART, legacy ports, PCI."""
