"""lapp-edge: train slim CNNs from scratch with LAPP and ship them to CPU/GPU targets."""

__version__ = "0.1.0"
