"""Observability: TensorBoard scalars, step timers, progress bars — written by rank 0 only."""
