"""captrt.runtime: torch-free inference (numpy, onnxruntime, pillow)."""
