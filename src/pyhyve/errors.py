"""One error tree. Every failure a user can cause or meet (bad input, a refusing host, a
hostile peer) is a PyhyveError whose message is the whole story, in one line; the branch
says in which phase it happened. Anything else that escapes is a bug: the commands print
"internal error" with the traceback for it, never a relabelled one-liner.

    PyhyveError
      BootFailed            building or booting a VM (config, kernel, KVM, console)
      SnapshotSaveFailed    writing a snapshot
      SnapshotLoadFailed    reading, checking or restoring a snapshot
      MigrationSourceFailed sending a VM
      MigrationDestFailed   receiving a VM
      ControlFailed         the control socket, either side
      RecordError           a recorded machine or state (snapshot or stream) is bad or
                            cannot run here; loaders re-raise it as their own phase's error
"""


class PyhyveError(Exception):
    """A user-facing failure; str() is one line that says what is wrong."""


class BootFailed(PyhyveError):
    pass


class SnapshotSaveFailed(PyhyveError):
    pass


class SnapshotLoadFailed(PyhyveError):
    pass


class MigrationSourceFailed(PyhyveError):
    pass


class MigrationDestFailed(PyhyveError):
    pass


class ControlFailed(PyhyveError):
    pass


class RecordError(PyhyveError, ValueError):
    """A recorded machine or state is malformed or cannot run here."""
