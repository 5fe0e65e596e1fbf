"""Training, evaluation, ONNX export and engine builds; imports client, never console."""
