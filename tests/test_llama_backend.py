"""The llama.cpp backend on its own: chat templates in a sandbox, sampling, context bounds."""

from __future__ import annotations

import pytest

from ml_service.backends.llama import (
    CancelFlag,
    Chunk,
    Coalescer,
    LlamaModel,
    PromptTooLong,
    SamplingParams,
    TemplateError,
    smollm2_path,
)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel(smollm2_path(), n_ctx=512, n_threads=2)


def test_the_gguf_chat_template_is_used(model: LlamaModel) -> None:
    prompt = model.render_chat([{"role": "user", "content": "Hello"}])
    assert model.has_chat_template
    assert prompt.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    # SmolLM2's own template adds its default system prompt when none is given
    assert "You are a helpful AI assistant named SmolLM" in prompt


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% for m in messages %}{{ m.update({'role': 'x'}) }}{% endfor %}",
    ],
)
def test_hostile_templates_cannot_reach_python(template: str) -> None:
    hostile = LlamaModel(smollm2_path(), n_ctx=256, n_threads=1, chat_template=template)
    try:
        with pytest.raises(TemplateError):
            hostile.render_chat([{"role": "user", "content": "hi"}])
    finally:
        hostile.close()


def test_raise_exception_in_a_template_is_a_clear_error() -> None:
    strict = LlamaModel(
        smollm2_path(),
        n_ctx=256,
        n_threads=1,
        chat_template="{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('first message must be from the user') }}{% endif %}",
    )
    try:
        with pytest.raises(TemplateError, match="first message must be from the user"):
            strict.render_chat([{"role": "assistant", "content": "hi"}])
    finally:
        strict.close()


def test_prompt_longer_than_the_context_is_refused(model: LlamaModel) -> None:
    with pytest.raises(PromptTooLong, match="the context holds 512"):
        model.generate("word " * 600, SamplingParams(max_tokens=4), CancelFlag(), lambda c: None)


def test_max_tokens_and_cancellation(model: LlamaModel) -> None:
    chunks: list[Chunk] = []
    model.generate("Once upon a time", SamplingParams(max_tokens=5), CancelFlag(), chunks.append)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens <= 6
    cancel = CancelFlag()
    seen: list[Chunk] = []

    def emit(chunk: Chunk) -> None:
        seen.append(chunk)
        if len(seen) == 2:
            cancel.cancel()

    model.generate("Once upon a time", SamplingParams(max_tokens=200), cancel, emit)
    assert seen[-1].finish_reason == "cancelled"
    assert len(seen) <= 4  # stopped within a token of the cancel


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fast_tokens_travel_together_slow_ones_alone() -> None:
    clock, sent = _Clock(), []
    emit = Coalescer(sent.append, 0.018, clock)
    for i in range(10):  # a token every 5 ms: four per 18 ms interval
        emit(Chunk(text=f"t{i} ", ttft_ms=3.0 if i == 0 else 0.0))
        clock.now += 0.005
    emit(Chunk(text="", finish_reason="length", prompt_tokens=4, completion_tokens=10))
    assert sent[0] == Chunk(text="t0 ", ttft_ms=3.0)  # the first text is never held
    assert [c.text for c in sent[1:]] == ["t1 t2 t3 t4 ", "t5 t6 t7 t8 ", "t9 "]
    assert sent[-1].finish_reason == "length"  # held text leaves with the last chunk
    assert (sent[-1].prompt_tokens, sent[-1].completion_tokens) == (4, 10)
    assert "".join(c.text for c in sent) == "".join(f"t{i} " for i in range(10))

    clock, slow = _Clock(), []
    emit = Coalescer(slow.append, 0.018, clock)
    for i in range(5):  # a token every 30 ms: slower than the interval, each one its own chunk
        emit(Chunk(text=f"s{i}"))
        clock.now += 0.030
    emit(Chunk(text="", finish_reason="stop"))
    assert [c.text for c in slow] == ["s0", "s1", "s2", "s3", "s4", ""]


def test_an_empty_opening_chunk_does_not_hold_the_first_text() -> None:
    clock, sent = _Clock(), []
    emit = Coalescer(sent.append, 0.050, clock)
    emit(Chunk(text=""))  # llama.cpp's first piece can be empty (a partial UTF-8 character)
    clock.now += 0.001
    emit(Chunk(text="Hello", ttft_ms=1.0))
    assert [c.text for c in sent] == ["", "Hello"]
