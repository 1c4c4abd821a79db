"""The normative formats: the XML hardware-state schema and the format specifications."""
