"""The ML worker process: a gRPC server over llama-cpp-python, onnxruntime and mediapipe."""
