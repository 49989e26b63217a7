"""The main process's side of inference: worker supervision, the gRPC client, orchestration."""
