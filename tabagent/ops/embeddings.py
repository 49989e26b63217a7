"""``embeddings.create``: OpenAI-compatible sentence embeddings."""

from __future__ import annotations

import base64
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tabagent.errors import BadRequest
from tabagent.ops.registry import Http, OpContext, OperationGroup

group = OperationGroup(tag="embeddings")

MAX_INPUTS = 2048
MAX_INPUT_CHARS = 100_000
Text = Annotated[str, Field(max_length=MAX_INPUT_CHARS)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Text | list[Text] = Field(description="A string or a list of strings.")
    model: str | None = Field(None, max_length=256, description="Default: the embedded model.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = Field(None, max_length=256)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


@group.operation("embeddings.create", http=Http("POST", "/v1/embeddings"))
async def create(ctx: OpContext, req: EmbeddingRequest) -> EmbeddingList:
    """Embed one or more texts (unit-length vectors; cosine similarity = dot product)."""
    ml = ctx.state.require_ml()
    inputs = [req.input] if isinstance(req.input, str) else req.input
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise BadRequest(f"input must hold 1 to {MAX_INPUTS} strings", param="input")
    model_id, vectors, prompt_tokens = await ml.embed(inputs, req.model, ctx.request_id)
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise BadRequest(
            f"{model_id} makes {vectors.shape[1]}-dimensional vectors; "
            f"dimensions={req.dimensions} is not supported",
            param="dimensions",
        )
    data = [
        Embedding(
            index=i,
            embedding=base64.b64encode(row.tobytes()).decode()
            if req.encoding_format == "base64"
            else row.tolist(),
        )
        for i, row in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return EmbeddingList(data=data, model=model_id, usage=usage)
