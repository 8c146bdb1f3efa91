"""Run folder -> bundle (TorchScript, ONNX, manifest), parity checks, bundle loading, Triton export."""
