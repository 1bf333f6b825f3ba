"""Unsupervised SimCSE: the InfoNCE loss, exact negatives from every rank (all-gather with gradient), GradCache."""
