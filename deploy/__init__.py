"""Trained models outside training: exports (TorchScript, ONNX, int8, safetensors) and explanations (Grad-CAM, attention)."""
