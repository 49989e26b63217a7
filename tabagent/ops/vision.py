"""``vision.faces``: faces in an image (boxes, keypoints, scores)."""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.errors import BadRequest
from tabagent.ops.registry import Http, OpContext, OperationGroup

group = OperationGroup(tag="vision")

MAX_IMAGE_BYTES = 20 * 1024 * 1024


class FacesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(
        max_length=MAX_IMAGE_BYTES * 4 // 3 + 256,
        description="PNG/JPEG/WebP/BMP bytes, base64 or a data: URL. "
        "Multipart uploads (field 'image') are accepted on the HTTP route too.",
    )
    min_confidence: float | None = Field(None, ge=0, le=1)
    model: str | None = Field(None, max_length=256)


class Point(BaseModel):
    name: str
    x: float
    y: float


class Face(BaseModel):
    box: list[float] = Field(description="[x, y, width, height], relative to the image (0-1)")
    score: float
    keypoints: list[Point]


class FacesResponse(BaseModel):
    faces: list[Face]
    width: int
    height: int
    inference_ms: float


def faces_of(reply: pb.DetectFacesResponse) -> list[Face]:
    return [
        Face(
            box=[f.x, f.y, f.width, f.height],
            score=f.score,
            keypoints=[Point(name=k.name, x=k.x, y=k.y) for k in f.keypoints],
        )
        for f in reply.faces
    ]


def decode_base64_image(value: str) -> bytes:
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64", param="image") from None
    if not data:
        raise BadRequest("image is empty", param="image")
    return data


async def detect(
    ctx: OpContext, data: bytes, min_confidence: float | None, model: str | None
) -> FacesResponse:
    ml = ctx.state.require_ml()
    model_id = ml.orchestrator.resolve(model, "vision")
    request = pb.DetectFacesRequest(model_id=model_id, encoded=data)
    if min_confidence is not None:
        request.min_confidence = min_confidence
    async with ml.orchestrator.use(model_id, ctx.request_id):
        reply = await ml.supervisor.unary(
            "DetectFaces", request, ctx.request_id, 60.0, "face detection"
        )
    return FacesResponse(
        faces=faces_of(reply),
        width=reply.width,
        height=reply.height,
        inference_ms=reply.inference_ms,
    )


@group.operation("vision.faces", http=Http("POST", "/v1/vision/faces", adapter="custom"))
async def faces(ctx: OpContext, req: FacesRequest) -> FacesResponse:
    """Detect faces in one image."""
    return await detect(ctx, decode_base64_image(req.image), req.min_confidence, req.model)
