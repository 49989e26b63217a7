"""Text generation: ``chat.complete``, ``text.complete``, ``text.tokenize``, ``text.detokenize``.

The request models accept OpenAI's fields (plus llama.cpp's top_k, min_p, repeat_penalty and
Ollama's keep_alive). Generation is one streaming operation: events ``delta`` (new text) and
``done`` (finish reason and usage). The OpenAI routes (``tabagent.api.openai``) either stream the
events as ``chat.completion.chunk`` objects or gather them into one response, so native
messaging and the data channel stream the very same events.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.errors import BadRequest
from tabagent.ops import recall
from tabagent.ops.registry import Http, OpContext, OperationGroup
from tabagent.storage.records import NewMessage, SearchHit

group = OperationGroup(tag="chat")

MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 1_000_000
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: float | str | None) -> float | None:
    """Ollama's keep_alive: seconds, or "5m"/"1h"/"30s"; negative keeps the model forever."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    match = _DURATION.match(value.strip())
    if match is None:
        raise BadRequest(
            f"keep_alive {value!r} is not a duration like 300, '5m' or '1h'", param="keep_alive"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class SamplingFields(BaseModel):
    """OpenAI sampling fields, plus llama.cpp's and Ollama's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None, max_length=256, description="Model id; default: the embedded chat model."
    )
    max_tokens: int | None = Field(None, ge=1, le=131072)
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000, description="llama.cpp extension")
    min_p: float | None = Field(None, ge=0, le=1, description="llama.cpp extension")
    repeat_penalty: float | None = Field(None, gt=0, le=4, description="llama.cpp extension")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    keep_alive: float | str | None = Field(None, description="Ollama extension: 300, '5m', -1")
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def sampling(self) -> pb.Sampling:
        sampling = pb.Sampling(max_tokens=self.max_completion_tokens or self.max_tokens or 0)
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(sampling, name, value)
        if self.repeat_penalty is None and self.frequency_penalty:
            sampling.repeat_penalty = 1.0 + max(0.0, self.frequency_penalty) / 2
        if self.stop:
            sampling.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        return sampling


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    conversation_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:\-]+$",
        description="TabAgent extension (or the X-Conversation-Id header): keep this chat in "
        "memory. New turns are stored, relevant memories from earlier conversations are added "
        "to the prompt, and older turns are summarised when the context fills. Send the whole "
        "history or only the new turn: both work.",
    )
    memory: bool = Field(
        True, description="TabAgent extension: recall memories (with a conversation_id)."
    )


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]
        | list[Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]]
    ) = Field(description="One prompt (a list must hold exactly one).")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported")
        return value


class Delta(BaseModel):
    event_name: ClassVar[str] = "delta"
    text: str
    model: str
    ttft_ms: float | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class MemoryUse(BaseModel):
    """What memory contributed to one answer (a TabAgent extension of the response)."""

    conversation_id: str
    memories: list[SearchHit] = Field(description="Recalled and added to the prompt.")
    summarized_turns: int = Field(description="Older turns replaced by the rolling summary.")
    stored_message_ids: list[int] = Field(description="Messages of this turn now stored.")


class Finished(BaseModel):
    event_name: ClassVar[str] = "done"
    finish_reason: str
    model: str
    usage: Usage
    tokens_per_second: float | None = None
    memory: MemoryUse | None = None


async def generate(
    ctx: OpContext, req: SamplingFields, input_: dict[str, Any]
) -> AsyncIterator[Delta | Finished]:
    ml = ctx.state.require_ml()
    model_id = ml.orchestrator.resolve(req.model, "chat")
    keep_alive = parse_keep_alive(req.keep_alive)
    request = pb.GenerateRequest(
        model_id=model_id,
        sampling=req.sampling(),
        stream_interval_ms=ctx.state.settings.stream_interval_ms,
        **input_,
    )
    async with ml.orchestrator.use(model_id, ctx.request_id, keep_alive):
        started = time.perf_counter()
        first_token_at: float | None = None
        async for chunk in ml.supervisor.stream(
            "Generate", request, ctx.request_id, ml.orchestrator.request_timeout, "generation"
        ):
            if chunk.text:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    ml.metrics.ttft.labels(model_id).observe(first_token_at - started)
                yield Delta(text=chunk.text, model=model_id, ttft_ms=chunk.ttft_ms or None)
            if chunk.finish_reason:
                elapsed = time.perf_counter() - (first_token_at or started)
                produced = chunk.usage.completion_tokens
                rate = produced / elapsed if produced and elapsed > 0 else None
                if rate is not None:
                    ml.metrics.tokens_per_second.labels(model_id).observe(rate)
                finish = chunk.finish_reason
                yield Finished(
                    finish_reason=finish if finish in ("length", "cancelled") else "stop",
                    model=model_id,
                    usage=Usage(
                        prompt_tokens=chunk.usage.prompt_tokens,
                        completion_tokens=produced,
                        total_tokens=chunk.usage.prompt_tokens + produced,
                    ),
                    tokens_per_second=rate,
                )


@group.operation("chat.complete", http=Http("POST", "/v1/chat/completions", adapter="custom"))
async def chat_complete(ctx: OpContext, req: ChatRequest) -> AsyncIterator[Delta | Finished]:
    """Chat with a model (OpenAI-compatible); streamed as deltas, then a final event.

    Messages are rendered with the model's own chat template.
    """
    pairs = [("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
    memory = ctx.state.memory
    if req.conversation_id is None or memory is None or not ctx.state.settings.memory:
        transcript = pb.ChatTranscript(
            messages=[pb.ChatMessage(role=role, content=text) for role, text in pairs]
        )
        async for event in generate(ctx, req, {"chat": transcript}):
            yield event
        return

    ml = ctx.state.require_ml()
    model_id = ml.orchestrator.resolve(req.model, "chat")
    reserve = req.max_completion_tokens or req.max_tokens or recall.DEFAULT_RESERVE_TOKENS
    plan = await recall.prepare(
        ctx, memory, req.conversation_id, pairs, model_id, reserve, recall_memories=req.memory
    )
    transcript = pb.ChatTranscript(
        messages=[pb.ChatMessage(role=role, content=text) for role, text in plan.transcript]
    )
    parts: list[str] = []
    async for event in generate(
        ctx, req.model_copy(update={"model": model_id}), {"chat": transcript}
    ):
        if isinstance(event, Delta):
            parts.append(event.text)
            yield event
            continue
        # stored before the final event: a client may stop reading once it has it
        answer = "".join(parts)
        if answer.strip():
            (saved,) = await memory.add_messages(
                req.conversation_id,
                [NewMessage(role="assistant", content=answer, model=model_id)],
            )
            plan.stored_ids.append(saved.id)
        await recall.learn(ctx, memory, plan)
        yield event.model_copy(
            update={
                "memory": MemoryUse(
                    conversation_id=req.conversation_id,
                    memories=plan.memories,
                    summarized_turns=plan.dropped,
                    stored_message_ids=plan.stored_ids,
                )
            }
        )


@group.operation("text.complete", http=Http("POST", "/v1/completions", adapter="custom"))
async def text_complete(ctx: OpContext, req: CompletionRequest) -> AsyncIterator[Delta | Finished]:
    """Continue a raw prompt (OpenAI legacy completions); no chat template."""
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    async for event in generate(ctx, req, {"prompt": prompt}):
        yield event


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=256)
    text: str = Field(max_length=MAX_CONTENT_CHARS)
    add_special: bool = Field(True, description="Add the model's BOS token, as generation does.")


class TokenizeResponse(BaseModel):
    model: str
    tokens: list[int]
    count: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=256)
    tokens: list[int] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    model: str
    text: str


@group.operation("text.tokenize", http=Http("POST", "/v1/tokenize"))
async def tokenize(ctx: OpContext, req: TokenizeRequest) -> TokenizeResponse:
    """Token ids of a text with a chat model's tokenizer (count included)."""
    ml = ctx.state.require_ml()
    model_id = ml.orchestrator.resolve(req.model, "chat")
    async with ml.orchestrator.use(model_id, ctx.request_id):
        reply = await ml.supervisor.unary(
            "Tokenize",
            pb.TokenizeRequest(model_id=model_id, text=req.text, add_special=req.add_special),
            ctx.request_id, 60.0, "tokenize",
        )  # fmt: skip
    return TokenizeResponse(model=model_id, tokens=list(reply.tokens), count=len(reply.tokens))


@group.operation("text.detokenize", http=Http("POST", "/v1/detokenize"))
async def detokenize(ctx: OpContext, req: DetokenizeRequest) -> DetokenizeResponse:
    """Text of token ids."""
    ml = ctx.state.require_ml()
    model_id = ml.orchestrator.resolve(req.model, "chat")
    async with ml.orchestrator.use(model_id, ctx.request_id):
        reply = await ml.supervisor.unary(
            "Detokenize", pb.DetokenizeRequest(model_id=model_id, tokens=req.tokens),
            ctx.request_id, 60.0, "detokenize",
        )  # fmt: skip
    return DetokenizeResponse(model=model_id, text=reply.text)
