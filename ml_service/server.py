"""Run the ML worker: ``python -m ml_service --listen unix:/path/worker.sock``.

The main process starts it (as ``tabagent-server ml-service`` in the frozen binary) with the
per-launch token in the environment (never in argv, which other users can read) and its own
pid, and waits for the standard health service to answer SERVING. SIGTERM drains: the health
status turns NOT_SERVING, in-flight calls get a grace period, models are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ml_service.lifecycle import TOKEN_ENV, TokenInterceptor, die_with_parent, watch_parent
from ml_service.proto import ml_inference_pb2_grpc as pb_grpc
from ml_service.service import MLService
from tabagent import logs

log = logging.getLogger("ml_service")

SERVICE_NAME = "tabagent.ml.v1.MLInference"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # an encoded image or a big embedding batch
GRACE_SECONDS = 5.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ml-service", description=__doc__)
    parser.add_argument(
        "--capabilities",
        action="store_true",
        help="print what this worker's libraries can do (JSON) and exit",
    )
    parser.add_argument("--listen", help="unix:/path/to.sock or 127.0.0.1:PORT")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process dies")
    parser.add_argument("--cache-dir", type=Path, help="converted-model cache")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.capabilities and (args.listen is None or args.cache_dir is None):
        parser.error("--listen and --cache-dir are required")
    return args


def capabilities() -> dict[str, object]:
    """onnxruntime's execution providers and whether llama.cpp can offload to a GPU."""
    from tabagent.hardware.run import list_onnxruntime_providers, llama_supports_gpu_offload

    return {
        "onnxruntime_providers": list_onnxruntime_providers(),
        "llama_gpu_offload": llama_supports_gpu_offload(),
    }


async def serve(args: argparse.Namespace, token: str) -> None:
    service = MLService(args.cache_dir)
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_MLInferenceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(args.listen) == 0 and not args.listen.startswith("unix:"):
        raise SystemExit(f"ml-service: cannot listen on {args.listen}")
    await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    watcher = None
    if args.parent_pid:
        die_with_parent(args.parent_pid)
        watcher = asyncio.create_task(watch_parent(args.parent_pid, stop.set))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ml worker %d serving on %s", os.getpid(), args.listen)
    await stop.wait()

    log.info("ml worker draining (grace %.0f s)", GRACE_SECONDS)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(GRACE_SECONDS)
    if watcher is not None:
        watcher.cancel()
    await service.close()
    log.info("ml worker stopped")


def prepare_socket(listen: str) -> None:
    """A private folder for the Unix socket, without a stale socket from a crashed worker."""
    if listen.startswith("unix:"):
        socket_path = Path(listen.removeprefix("unix:").removeprefix("//"))
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket_path.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.capabilities:
        sys.stdout.write(json.dumps(capabilities()) + "\n")
        return
    prepare_socket(args.listen)
    # mediapipe imports matplotlib, which writes a font cache: keep it in our cache, not the
    # user's ~/.cache and ~/.config.
    os.environ.setdefault("MPLCONFIGDIR", str(args.cache_dir / "matplotlib"))
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        sys.stderr.write(f"ml-service: {TOKEN_ENV} is not set; the worker only serves its parent\n")
        sys.exit(2)
    logs.configure(args.log_level.upper(), args.log_dir, file_name="ml_worker.log")
    asyncio.run(serve(args, token))
