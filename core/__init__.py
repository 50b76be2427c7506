"""Foundation helpers shared by every stage: one-line errors, provenance, devices, list files, atomic writes, the heap policy."""
