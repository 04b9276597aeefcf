"""The WGSL kernels, one op per file: installed as the package `loralabd.shaders` (see pyproject.toml) and
read by loralabd.engine.webgpu.runtime through importlib.resources."""
