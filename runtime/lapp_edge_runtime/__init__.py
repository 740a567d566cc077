"""lapp-edge-runtime: run a lapp-edge device bundle with numpy, Pillow and one runtime.

A bundle is a tar archive (`.tar` or `.tar.gz`) built by `lapp_edge.ship` for one
target profile. It holds the artifact for that target's runtime, `bundle.json` (sha256
of every other member, the preprocessing spec, class names, runtime settings, the
tolerance) and a few real test images with the outputs the runtime gave when the bundle
was built. This package imports neither PyTorch nor `lapp_edge`.
"""

__version__ = "0.1.0"
