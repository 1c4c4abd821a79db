"""QEMU migration streams (QEMU 7.2, x86-64 pc and q35): reading, writing, split and join."""
