"""The napari plugin: the dock widget, sample data, the dataset reader and the mask writer.

triton is kept out of the viewer's process. triton >= 3.7 carries its own LLVM, which clashes
with the LLVM that Mesa's OpenGL driver (llvmpipe, radeonsi, ...) has already loaded, and
napari dies with a segmentation fault when torchvision imports it (through torch._dynamo).
The plugin never compiles kernels, so it tells Python there is no triton, unless triton is
already imported or SHORTCUT_UNLEARNING_ALLOW_TRITON=1 is set.
"""

import os
import sys

if "triton" not in sys.modules and os.environ.get("SHORTCUT_UNLEARNING_ALLOW_TRITON") != "1":
    sys.modules["triton"] = None  # import triton -> ImportError; find_spec -> None
