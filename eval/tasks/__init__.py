"""Evaluation tasks, one module each; discovered by :mod:`cosettle.eval.task`."""
