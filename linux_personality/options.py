"""What a user sets about a new guest's Linux environment (vmstate run's options)."""

from __future__ import annotations

from dataclasses import field

from vmstate.record import record
from vmstate.state import GuestLimits


@record
class GuestOptions:
    cwd: str = "/"                       # the guest's starting directory, inside the root
    hostname: str = "vmstate"
    limits: GuestLimits = field(default_factory=GuestLimits)   # saved with the VM (vmm-limits)
