"""The VMM: the only code that touches /dev/kvm. It runs static x86-64 Linux programs in a
KVM virtual machine, services their system calls, and captures and applies VM state."""
