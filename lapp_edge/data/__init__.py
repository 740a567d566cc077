"""Datasets: numpy readers (`readers`, no torch) and torch batching (`torch_data`)."""
