"""The software CPU as the session code sees a backend: boot a program or restore a state."""

from __future__ import annotations

from linux_personality.options import GuestOptions

from .vm import SoftMachine


class SoftBackend:
    name = "soft"
    counts_instructions = True

    def boot(self, program: str, argv: list[str], memory_size: int, root: str,
             options: GuestOptions) -> SoftMachine:
        return SoftMachine.boot(program, argv, memory_size, root, options)

    def restore(self, state, memory, root: str) -> SoftMachine:
        return SoftMachine.restore(state, memory, root)

    @staticmethod
    def run_options(vm: SoftMachine, save, max_instructions: int | None) -> dict:
        """SoftMachine.run's arguments: the para-calls (401-403, with the command's migration
        options) and the instruction budget."""
        options = {"paracalls": save.paracalls(vm)}
        if max_instructions is not None:
            options["max_instructions"] = max_instructions
        return options
