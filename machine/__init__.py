"""The CPU-independent machine both backends (kvm_backend, soft_backend) build on: guest
memory, the guest's tiny kernel (layout), booting and execve, mprotect in the guest's page
tables, stop requests, para-calls, live migration, and the Machine base class (the
personality's state, restore, capture, saves and the run loop's shape). It imports neither
backend."""
