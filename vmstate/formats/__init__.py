"""The formats vmstate reads and writes, behind one registry (see vmstate.formats.registry)."""
