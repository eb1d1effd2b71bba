"""Restoration of scans: the planner, the slice and volume paths, noise, classical methods."""
