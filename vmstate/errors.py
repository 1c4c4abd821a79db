"""One exception tree for everything vmstate reports to a user, and the exit codes.

Library code raises these with the context in the message (file, offset, address); only the
CLI turns them into a one-line message and an exit status.
"""

# Exit statuses of the `vmstate` command (documented in the README). A guest's own exit status
# passes through unchanged, so these follow the shell's conventions (env, timeout, nohup).
EXIT_USAGE = 2            # bad command line (typer/click)
EXIT_NO_KVM = 124         # /dev/kvm missing, not permitted, or cannot create a VM
EXIT_ERROR = 125          # vmstate itself failed: bad image, XML, core, stream, I/O
EXIT_CANNOT_RUN = 126     # the program is not a static x86-64 Linux executable, or does not fit
EXIT_NOT_FOUND = 127      # the program or image file does not exist
EXIT_SIGNAL_BASE = 128    # guest fault: 128 + the signal Linux would have sent (SIGSEGV -> 139)


class VmstateError(Exception):
    exit_code = EXIT_ERROR


class UsageError(VmstateError):
    """The command line asks for something vmstate will not do (e.g. overwrite an input)."""
    exit_code = EXIT_USAGE


class FileMissingError(VmstateError):
    exit_code = EXIT_NOT_FOUND


class ProgramError(VmstateError):
    """The guest program cannot be loaded (not ELF, dynamic, PIE, wrong machine, too big)."""
    exit_code = EXIT_CANNOT_RUN


class KvmNotAvailableError(VmstateError):
    exit_code = EXIT_NO_KVM


class FormatError(VmstateError):
    """A file or stream does not follow its format. `where` names the file and offset/line."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(f"{where}: {message}" if where else message)


class ImageError(FormatError):
    pass


class RestoreError(VmstateError):
    pass


def describe_error(error: BaseException) -> str:
    """One line for any exception: ours say what and where; system errors keep their path."""
    if isinstance(error, VmstateError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return f"{type(error).__name__}: {error}"


SHORT_VALUE = 40


def shorten(text: str, limit: int = SHORT_VALUE) -> str:
    """A value to quote in a message: at most `limit` characters of it, and its length if cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


MAX_MESSAGE = 400


def shorten_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """A message whose quoted value is huge: its beginning and its end (where the reason is),
    with what was left out counted."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[:limit - tail]} ...[{len(text) - limit} characters]... {text[-tail:]}"
