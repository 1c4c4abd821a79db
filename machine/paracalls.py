"""Para-calls: system calls numbered next to SAVE (400) that a guest makes to its VMM
(examples/vmstate_paracalls.h). They act on the whole VM, so the backend serves them, not the
Linux personality.

    401 DUMP_PROCESSOR_STATE()   print the vCPU's state to the VMM's stderr; returns 0
    402 SNAPSHOT(path)           write an image of the VM to `path` (inside the guest root)
                                 and go on: 0 here, 1 in a VM restored from the image
    403 MIGRATE("host:port")     cold-migrate to a `vmstate receive`: 1 on the destination;
                                 on failure -errno here, and the VM goes on

A failure is a negative errno in RAX and never ends the VM.
"""

from __future__ import annotations

import errno
import os
import sys

from vmstate.errors import VmstateError
from linux_personality.cpu import GuestFault

from .base import SLICE_ENDED, Machine

PARACALL_DUMP_PROCESSOR_STATE = 401
PARACALL_SNAPSHOT = 402
PARACALL_MIGRATE = 403
NAMES = {PARACALL_DUMP_PROCESSOR_STATE: "vmstate_dump_processor_state",
         PARACALL_SNAPSHOT: "vmstate_snapshot", PARACALL_MIGRATE: "vmstate_migrate"}
RESTORED = 1                      # what SNAPSHOT and MIGRATE return in the VM's copy
DUMP_INSTRUCTIONS = 6
ADDRESS_MAX = 512


class ParaCalls:
    def __init__(self, vm: Machine, connect_timeout: float = 30.0,
                 with_files: bool = False, log=sys.stderr, live=None):
        """`live`: a LiveOptions to make MIGRATE a live migration (--live)."""
        self.vm = vm
        self.live = live
        self.connect_timeout = connect_timeout
        self.with_files = with_files
        self.log = log
        self._handlers = {PARACALL_DUMP_PROCESSOR_STATE: self._dump,
                          PARACALL_SNAPSHOT: self._snapshot, PARACALL_MIGRATE: self._migrate}

    def serves(self, nr: int) -> bool:
        return nr in self._handlers

    def serve(self, nr: int, args: tuple[int, ...], trace=None) -> str | None:
        """Serve the para-call the vCPU stopped on; SLICE_ENDED if the VM is being sent (a
        cold MIGRATE: the VM stays stopped until the receiver answers, Machine.handing_over).
        `trace` (a text stream) gets a line like --trace's."""
        try:
            result = self._handlers[nr](args[0])
        except GuestFault:
            result = -errno.EFAULT
        except OSError as e:
            result = -(e.errno or errno.EIO)
        except VmstateError as e:            # e.g. a VM with a pipe open cannot be saved yet
            print(f"vmstate: [{self.vm.name}] para-call {nr} failed: {e}", file=self.log,
                  flush=True)
            result = -_errno_of(e, errno.EOPNOTSUPP)
        if trace is not None:
            shown = "" if nr == PARACALL_DUMP_PROCESSOR_STATE else self._string_argument(args[0])
            print(f"{NAMES[nr]}({shown}) = " + (str(result) if isinstance(result, int)
                                                 else "(the VM is being sent)"), file=trace,
                  flush=True)
        if isinstance(result, int):
            self.vm.return_to_user(result)
            return None
        return result

    def _string_argument(self, addr: int) -> str:
        """How --trace shows a string argument: quoted, or its address if unreadable."""
        try:
            return '"' + self.vm.memory.read_cstring(addr, ADDRESS_MAX).decode(
                errors="backslashreplace") + '"'
        except GuestFault:
            return f"{addr:#x}"

    # -- 401 ------------------------------------------------------------------------------------

    def _dump(self, _arg: int) -> int:
        self.log.write(self.dump_text())
        self.log.flush()
        return 0

    def dump_text(self, settle: bool = True) -> str:
        """The vCPU's state as the guest resumes it, one block of lines tagged with the VM's
        name. `settle`: the vCPU is stopped on the para-call, which returns 0 (else it is
        between slices, see Machine.pause)."""
        from vmstate import info
        vm = self.vm
        if settle:
            vm.settle(0)
        state = vm.capture_vcpu()
        lines = [f"processor state of VM {vm.name} (program {vm.program})"]
        lines += info.render_vcpu(info.describe_vcpu(vm.memory, state, DUMP_INSTRUCTIONS),
                                  with_msrs=False)
        return "".join(f"[{vm.name}] {line}\n" for line in lines)

    # -- 402 ------------------------------------------------------------------------------------

    def _snapshot(self, path_addr: int) -> int:
        path = os.fsdecode(self.vm.memory.read_cstring(path_addr, 4096))
        namespace = self.vm.files.namespace
        head, _, name = namespace.absolute(path).rpartition("/")
        if name in ("", ".", ".."):
            return -errno.EISDIR
        dir_fd = namespace.open(head or "/", os.O_PATH | os.O_DIRECTORY)
        try:
            if _same_file(dir_fd, name, self.vm.program):
                return -errno.ETXTBSY            # never write over the program it runs
            self.vm.settle(RESTORED)
            return _write(f"/proc/self/fd/{dir_fd}/{name}", self.vm)
        finally:
            os.close(dir_fd)

    # -- 403 ------------------------------------------------------------------------------------

    def _migrate(self, address_addr: int) -> int | str:
        from vmstate.migration.protocol import parse_address
        text = self.vm.memory.read_cstring(address_addr, ADDRESS_MAX).decode(errors="replace")
        try:
            address = parse_address(text)
        except VmstateError:
            return -errno.EINVAL
        if self.live is not None:
            return self._migrate_live(address)
        self.vm.settle(RESTORED)

        def failed(e: BaseException) -> None:
            print(f"vmstate: [{self.vm.name}] MIGRATE to {text} failed: {e}; the VM goes on",
                  file=self.log, flush=True)
            self.vm.return_to_user(-_errno_of(e, errno.ECONNREFUSED))
        from .live import ColdSend
        self.vm.send_away(ColdSend(self.vm, address, self.connect_timeout, self.with_files,
                                   self.vm.files.root, failed))
        return SLICE_ENDED      # the run loop goes on; the receiver's answer ends the VM


    def _migrate_live(self, address: tuple[str, int]) -> int:
        """Under --live the migration starts and the call returns 0 at once: the guest runs
        on while its memory is sent and goes on at the destination from wherever it then is
        (there is no return to see there). A failure is reported on stderr and the guest
        goes on here."""
        from .live import live_migrate_to
        self.vm.begin_live_migration(live_migrate_to(
            address, self.connect_timeout, self.with_files, self.vm.files.root, self.live,
            self.log))
        return 0


def _same_file(dir_fd: int, name: str, program: str) -> bool:
    try:
        target, other = os.stat(name, dir_fd=dir_fd), os.stat(program)
    except OSError:
        return False
    return (target.st_dev, target.st_ino) == (other.st_dev, other.st_ino)


def _write(path: str, vm: Machine) -> int:
    from vmstate.image.writer import write_image
    try:
        write_image(path, vm.capture(), [vm.memory.view])
    except VmstateError as e:
        return -_errno_of(e, errno.EIO)
    return 0


def _errno_of(error: BaseException, default: int) -> int:
    """The errno behind an error (ours keep the OSError they replaced as their context)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno:
            return error.errno
        if isinstance(error, TimeoutError):         # socket.timeout is TimeoutError
            return errno.ETIMEDOUT
        error = error.__context__
    return default
