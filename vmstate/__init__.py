"""vmstate: save, inspect, edit and migrate the state of small KVM virtual machines."""

__version__ = "0.1.0"
