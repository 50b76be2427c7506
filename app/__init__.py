"""The application layer over the three stages: sweeps, the results table, reports, the demo, the umbrella CLI."""
