"""Frame-level evaluation: label propagation, the DAVIS/JHMDB/VIP readers and scorers, the analysis metrics."""
