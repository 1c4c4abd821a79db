"""What a user sets about a new guest's Linux environment (vmstate run's options)."""

from __future__ import annotations

from dataclasses import dataclass

from .fdtable import DEFAULT_MAX_FDS


@dataclass(frozen=True)
class GuestOptions:
    cwd: str = "/"                       # the guest's starting directory, inside the root
    hostname: str = "vmstate"
    max_file_size: int | None = None     # bytes a guest write may make a file reach (EFBIG)
    max_fds: int = DEFAULT_MAX_FDS         # the guest's open descriptor cap (EMFILE)
