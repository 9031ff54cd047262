"""The benchmark harness behind `shortcut-unlearning bench`: development tooling, outside the
core. Nothing outside this package and the command line's `bench` imports it; widget.py
drives the napari plugin and needs Qt."""
