"""Data service: tokenized task tables, world-size-independent sample orders,
per-rank streams with resumable scalar state, collation and the task schedule."""
