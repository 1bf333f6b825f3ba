"""Benchmarks that run the real system and report one JSON object (`dist-minbert bench ...`)."""
