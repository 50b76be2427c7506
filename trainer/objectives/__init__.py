"""Training objectives on cached features, one module each; discovered by :mod:`cosettle.trainer.objective`."""
