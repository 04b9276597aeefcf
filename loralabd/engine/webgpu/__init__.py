"""The WebGPU backend (wgpu-py, WGSL kernels in shaders/): see docs/webgpu.md.

runtime.py — device, caches, programs; kernels.py — one wrapper per WGSL entry point;
engine.py — WebGPUEngine (NumpyEngine's interface); train.py — the train session.
"""
