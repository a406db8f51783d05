"""The snapshot package's error: kept apart so every module of the package can raise it."""


from ..errors import SnapshotLoadFailed


class SnapshotError(SnapshotLoadFailed, ValueError):
    """The snapshot cannot be written, read or trusted; the message says why."""
