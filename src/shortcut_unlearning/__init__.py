"""Remove shortcuts that segmentation models learn from coarse lesion masks."""

__version__ = "0.1.0"
