"""cxrlt: shared logic for the CXR-LT 2026 submission pipeline.

The top-level scripts (preprocess.py, train.py, ...) are thin command-line wrappers over
the modules in this package. Files between stages are the interfaces; docs/formats.md specifies them.
"""

__version__ = "0.1.0"
