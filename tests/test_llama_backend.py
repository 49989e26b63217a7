"""The llama.cpp backend on its own: chat templates in a sandbox, sampling, context bounds."""

from __future__ import annotations

import pytest

from ml_service.backends.llama import (
    CancelFlag,
    Chunk,
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
