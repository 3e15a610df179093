"""Canny-to-image over folders: `local` (queue, manifest, resume; one process) and `ray` (the same
jobs on Ray actors, one per GPU). Import from the modules; `ray` is imported only when asked for.
"""
