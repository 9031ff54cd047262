"""The napari face of shortcut-unlearning: a thin layer over the Qt-free core."""
