"""Objects that own one file descriptor."""

import os


class FdOwner:
    """Owns `self.fd`: close() closes it once; usable as a context manager."""

    fd: int = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
