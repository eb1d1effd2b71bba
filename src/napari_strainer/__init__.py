"""napari-strainer: STRAINER implicit neural representations for medical scans.

Pretrain a shared SIREN encoder on a few scans, then fit, super-resolve and denoise new ones.
"""

__version__ = "0.1.0"
