"""The export stage: fuse, ONNX, verify against PyTorch, write a model package."""
