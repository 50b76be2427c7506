"""Stage two: the Co-Settle projection trained from cached backbone tokens."""
