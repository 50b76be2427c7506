"""Evaluation of dense video representations: label propagation, official scorers and analysis metrics."""
