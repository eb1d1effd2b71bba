"""napari front end: readers, writers, sample data and the "Pretrain encoder", "Restore scan"
and "Fuse stacks" dock widgets (contributed through ``napari.yaml``).

Nothing here is imported by the core package, so napari stays an optional dependency.
"""
