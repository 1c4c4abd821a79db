"""Cold migration of a VM over TCP: the wire protocol (schemas/migration-protocol.md), the
sender and the receiver."""
