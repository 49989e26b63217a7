"""Hardware detection (``detect``) and what it recommends for loading models (``recommend``).

Nothing here imports a heavy library at module level: the CLI's start-up must not pay for
NVML, onnxruntime or llama.cpp until a probe asks.
"""
