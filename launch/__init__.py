"""Where Ray lives: the Ray Train entry that `ray job submit` runs, and the local embedded run."""
