"""Target backends (installed as ``structexport.targets``): ONNX Runtime on CPU and
Apache TVM for x86, 64-bit ARM and CUDA arrive with the convert and TVM work."""
