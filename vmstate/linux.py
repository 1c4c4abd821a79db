"""Linux (x86-64) flag names shared by the VMM's trace and the toolkit's views."""

OPEN_FLAGS = [(0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
              (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"),
              (0o40000, "O_DIRECT"), (0o100000, "O_LARGEFILE"), (0o200000, "O_DIRECTORY"),
              (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"), (0o2000000, "O_CLOEXEC"),
              (0o4000000, "O_SYNC"), (0o10000000, "O_PATH")]
ACCESS_MODES = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")


def flag_names(value: int, table, zero: str = "0", access_mode: bool = False) -> str:
    """`value` as NAME|NAME|0xrest; with access_mode, the low two bits as O_RDONLY etc."""
    names = []
    if access_mode:
        names.append(ACCESS_MODES[value & 3])
        value &= ~3
    for bit, name in table:
        if value & bit:
            names.append(name)
            value &= ~bit
    if value:
        names.append(hex(value))
    return "|".join(names) or zero


def open_flag_names(flags: int) -> str:
    return flag_names(flags, OPEN_FLAGS, access_mode=True)
