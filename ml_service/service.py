"""The MLInference servicer: loaded models and the RPCs over them.

Blocking inference never runs on the event loop: model loads, generation, embeddings and face
detection go to threads. Backend exceptions become real gRPC status codes (see the proto).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import numpy.typing as npt

from ml_service.backends.llama import (
    CancelFlag,
    Chunk,
    Coalescer,
    LlamaModel,
    PromptTooLong,
    SamplingParams,
    TemplateError,
)
from ml_service.lifecycle import REQUEST_ID_METADATA, rss_bytes
from ml_service.proto import ml_inference_pb2 as pb
from ml_service.proto import ml_inference_pb2_grpc as pb_grpc
from tabagent import __version__
from tabagent.logs import request_id_var

log = logging.getLogger(__name__)

DEFAULT_FACE_MODEL = "mediapipe-face-detection"
MAX_EMBED_INPUTS = 2048
MAX_INPUT_CHARS = 1_000_000
MAX_FRAME_PIXELS = 8_294_400  # 4K UHD
# The face graph drops detections below its construction threshold, so it is built with a low
# floor and each call filters at its own threshold (default 0.5, mediapipe's usual).
FACE_FLOOR = 0.05
DEFAULT_FACE_CONFIDENCE = 0.5
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@\-]{0,199}")
_DONE = object()


@dataclass
class Loaded:
    info: pb.ModelInfo
    backend: Any


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


def _bind_request_id(context: grpc.aio.ServicerContext) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA:
            request_id_var.set(str(value)[:128])
            return


class MLService(pb_grpc.MLInferenceServicer):
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.started = time.monotonic()
        self.models: dict[str, Loaded] = {}
        self._load_lock = asyncio.Lock()

    # ---- model management ----

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        _bind_request_id(context)
        if not _MODEL_ID.fullmatch(request.model_id):
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"bad model id {request.model_id!r}"
            )
        if request.backend == pb.BACKEND_UNSPECIFIED:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "backend is required")
        async with self._load_lock:
            existing = self.models.get(request.model_id)
            if existing is not None:
                if existing.info.path == request.path and existing.info.backend == request.backend:
                    return existing.info
                await _abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{request.model_id} is already loaded from {existing.info.path}; "
                    "unload it first",
                )
            before = rss_bytes()
            start = time.perf_counter()
            try:
                backend, extra = await asyncio.to_thread(self._construct, request)
            except FileNotFoundError as exc:
                await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
            except (ValueError, OSError) as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"cannot load: {exc}")
            info = pb.ModelInfo(
                model_id=request.model_id,
                backend=request.backend,
                path=request.path,
                load_seconds=time.perf_counter() - start,
                memory_bytes=max(0, rss_bytes() - before),
                **extra,
            )
            self.models[request.model_id] = Loaded(info, backend)
            log.info("loaded %s in %.2f s", request.model_id, info.load_seconds)
            return info

    def _construct(self, request: pb.LoadModelRequest) -> tuple[Any, dict[str, Any]]:
        if request.backend == pb.LLAMA_CPP:
            opts = request.llama
            model = LlamaModel(
                request.path,
                n_ctx=opts.n_ctx,
                n_threads=opts.n_threads,
                n_batch=opts.n_batch,
                n_gpu_layers=opts.n_gpu_layers,
                chat_template=opts.chat_template,
            )
            return model, {
                "context_length": model.context_length,
                "has_chat_template": model.has_chat_template,
                "n_threads": model.n_threads,
                "n_gpu_layers": opts.n_gpu_layers,
            }
        if request.backend == pb.ONNX_EMBEDDING:
            from ml_service.backends.onnx_embed import OnnxEmbedder

            model_dir = Path(request.path)
            if not model_dir.is_dir():
                raise FileNotFoundError(f"no model folder at {model_dir}")
            onnx_path = _onnx_file(model_dir, self.cache_dir / "onnx")
            embedder = OnnxEmbedder(
                model_dir,
                onnx_path,
                providers=list(request.onnx.providers) or None,
                threads=request.onnx.threads or None,
            )
            return embedder, {
                "embedding_dimensions": embedder.dimensions,
                "context_length": embedder.max_tokens,
                "providers": list(embedder.providers),
            }
        if request.backend == pb.MEDIAPIPE_FACES:
            from ml_service.backends.faces import FaceDetector

            return FaceDetector(min_confidence=FACE_FLOOR), {}
        raise ValueError(f"unknown backend {request.backend}")

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        _bind_request_id(context)
        async with self._load_lock:
            loaded = self.models.pop(request.model_id, None)
        if loaded is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"{request.model_id} is not loaded")
        close = getattr(loaded.backend, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
        log.info("unloaded %s", request.model_id)
        return pb.UnloadModelResponse(unloaded=True)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.info for m in self.models.values()])

    async def GetStatus(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        return pb.StatusResponse(
            pid=os.getpid(),
            rss_bytes=rss_bytes(),
            uptime_seconds=time.monotonic() - self.started,
            models=[m.info for m in self.models.values()],
            version=__version__,
        )

    async def _model(self, model_id: str, backend: int, context: grpc.aio.ServicerContext) -> Any:
        loaded = self.models.get(model_id)
        if loaded is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"model {model_id!r} is not loaded")
        if loaded.info.backend != backend:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model_id!r} cannot serve this call "
                f"(it is a {pb.Backend.Name(loaded.info.backend)} model)",
            )
        return loaded.backend

    # ---- text ----

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        _bind_request_id(context)
        model = await self._model(request.model_id, pb.LLAMA_CPP, context)
        params = _sampling(request.sampling)
        try:
            if request.WhichOneof("input") == "chat":
                messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                if not messages:
                    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "messages is empty")
                prompt = model.render_chat(messages)
            else:
                prompt = request.prompt
        except TemplateError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if len(prompt) > MAX_INPUT_CHARS:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt over {MAX_INPUT_CHARS} characters",
            )

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = CancelFlag()

        def send(chunk: Chunk) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        emit = (
            Coalescer(send, request.stream_interval_ms / 1000)
            if request.stream_interval_ms
            else send
        )
        job = loop.run_in_executor(None, model.generate, prompt, params, cancel, emit)
        job.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            while (item := await queue.get()) is not _DONE:
                assert isinstance(item, Chunk)
                yield pb.GenerateChunk(
                    text=item.text,
                    finish_reason=item.finish_reason,
                    usage=pb.Usage(
                        prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens
                    ),
                    ttft_ms=item.ttft_ms,
                )
            error = job.exception()
        finally:
            cancel.cancel()  # the caller went away, or we are done: free the slot within a token
        if isinstance(error, PromptTooLong):
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        if error is not None:
            log.error("generation failed: %r", error)
            await _abort(context, grpc.StatusCode.INTERNAL, f"generation failed: {error}")

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        model = await self._model(request.model_id, pb.LLAMA_CPP, context)
        if len(request.text) > MAX_INPUT_CHARS:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"text over {MAX_INPUT_CHARS} characters"
            )
        tokens = await asyncio.to_thread(model.tokenize, request.text, request.add_special)
        return pb.TokenizeResponse(tokens=tokens)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        model = await self._model(request.model_id, pb.LLAMA_CPP, context)
        try:
            text = await asyncio.to_thread(model.detokenize, list(request.tokens))
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.DetokenizeResponse(text=text)

    # ---- embeddings ----

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        _bind_request_id(context)
        model = await self._model(request.model_id, pb.ONNX_EMBEDDING, context)
        inputs = list(request.inputs)
        if not inputs:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "inputs is empty")
        if len(inputs) > MAX_EMBED_INPUTS:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_EMBED_INPUTS} inputs per call",
            )
        if any(len(text) > MAX_INPUT_CHARS for text in inputs):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"an input is over {MAX_INPUT_CHARS} characters",
            )

        vectors, tokens = await asyncio.to_thread(model.embed_counted, inputs)
        return pb.EmbedResponse(
            dimensions=int(vectors.shape[1]),
            vectors=np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
            prompt_tokens=tokens,
        )

    # ---- vision ----

    async def _face_detector(self, model_id: str, context: grpc.aio.ServicerContext) -> Any:
        if not model_id:
            model_id = DEFAULT_FACE_MODEL
            if model_id not in self.models:
                await self.LoadModel(
                    pb.LoadModelRequest(model_id=model_id, backend=pb.MEDIAPIPE_FACES), context
                )
        return await self._model(model_id, pb.MEDIAPIPE_FACES, context)

    async def DetectFaces(
        self, request: pb.DetectFacesRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetectFacesResponse:
        _bind_request_id(context)
        detector = await self._face_detector(request.model_id, context)
        from ml_service.backends.faces import ImageError, decode_image

        min_conf = _face_threshold(request)
        try:
            if request.WhichOneof("image") == "encoded":
                rgb = await asyncio.to_thread(decode_image, request.encoded)
            elif request.WhichOneof("image") == "raw":
                rgb = _raw_frame(request.raw)
            else:
                raise ImageError("no image given")
            start = time.perf_counter()
            faces = await asyncio.to_thread(detector.detect, rgb, min_conf)
        except (ImageError, ValueError) as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RuntimeError as exc:  # DetectionError: the graph failed and was rebuilt
            await _abort(context, grpc.StatusCode.INTERNAL, str(exc))
        return pb.DetectFacesResponse(
            faces=[_face(f) for f in faces],
            width=rgb.shape[1],
            height=rgb.shape[0],
            inference_ms=(time.perf_counter() - start) * 1000,
        )

    async def DetectFacesStream(
        self, request_iterator: AsyncIterator[pb.VideoFrame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FrameDetections]:
        _bind_request_id(context)
        from ml_service.backends.faces import ImageError

        detector = None
        async for frame in request_iterator:
            if detector is None:
                detector = await self._face_detector(frame.model_id, context)
            min_conf = _face_threshold(frame)
            try:
                rgb = _raw_frame(frame.frame)
                start = time.perf_counter()
                faces = await asyncio.to_thread(detector.detect, rgb, min_conf)
            except (ImageError, ValueError) as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            yield pb.FrameDetections(
                timestamp_us=frame.timestamp_us,
                faces=[_face(f) for f in faces],
                inference_ms=(time.perf_counter() - start) * 1000,
            )

    async def close(self) -> None:
        for loaded in list(self.models.values()):
            close = getattr(loaded.backend, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
        self.models.clear()


def _onnx_file(model_dir: Path, cache_dir: Path) -> Path:
    """The ONNX graph of an embedding model: converted once from its safetensors (the embedded
    default), or the one a pulled repo ships (``onnx/model.onnx``, the plainest first)."""
    from ml_service.backends.onnx_embed import ensure_onnx

    if (model_dir / "model.safetensors").is_file():
        return ensure_onnx(model_dir, cache_dir)
    shipped = sorted(
        model_dir.rglob("*.onnx"),
        key=lambda p: (len(p.relative_to(model_dir).parts), "quant" in p.name, p.name),
    )
    if not shipped:
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor an .onnx file")
    return shipped[0]


def _sampling(s: pb.Sampling) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else defaults.temperature,
        top_p=s.top_p if s.HasField("top_p") else defaults.top_p,
        top_k=s.top_k if s.HasField("top_k") else defaults.top_k,
        min_p=s.min_p if s.HasField("min_p") else defaults.min_p,
        repeat_penalty=s.repeat_penalty
        if s.HasField("repeat_penalty")
        else defaults.repeat_penalty,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
    )


def _face_threshold(message: pb.DetectFacesRequest | pb.VideoFrame) -> float:
    if message.HasField("min_confidence"):
        return max(FACE_FLOOR, message.min_confidence)
    return DEFAULT_FACE_CONFIDENCE


def _raw_frame(raw: pb.RawImage) -> npt.NDArray[np.uint8]:
    from ml_service.backends.faces import ImageError

    if raw.width == 0 or raw.height == 0 or raw.width * raw.height > MAX_FRAME_PIXELS:
        raise ImageError(
            f"frame size {raw.width}x{raw.height} is outside 1..{MAX_FRAME_PIXELS} pixels"
        )
    if len(raw.rgb) != raw.width * raw.height * 3:
        raise ImageError(
            f"a {raw.width}x{raw.height} RGB frame needs {raw.width * raw.height * 3} bytes"
        )
    return np.frombuffer(raw.rgb, dtype=np.uint8).reshape(raw.height, raw.width, 3)


def _face(face: Any) -> pb.Face:
    return pb.Face(
        x=face.x,
        y=face.y,
        width=face.width,
        height=face.height,
        score=face.score,
        keypoints=[pb.Keypoint(name=k.name, x=k.x, y=k.y) for k in face.keypoints],
    )
