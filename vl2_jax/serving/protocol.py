"""The server's request bodies (pydantic) and their translation into this package's terms.

Three dialects come in: OpenAI's `POST /v1/chat/completions` and `POST /v1/completions`, and SGLang's
`POST /generate`. Each body model reads only the fields it knows (unknown fields are ignored, as both
servers do) and turns into a `Sampling` (the settings of one answer) plus a prompt: a conversation and
its image references for chat, a raw prompt (text or token ids) for the other two. Fields that ask for
something this server does not do (tools, logprobs, n > 1, penalties other than the repetition
penalty, structured output) are refused with an `APIError` that names the field, never ignored.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status of
the failure (`APIError`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from vl2_jax.processor import IMAGE_TOKEN
from vl2_jax.sampling import sampling_error

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answer: HTTP `status`, OpenAI's error body (`body()`), extra `headers` (Retry-After)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        # (text quoted from a request may hold a lone surrogate, which no JSON response can carry)
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def not_supported(param: str, what: str, instead: str = "") -> APIError:
    return APIError(400, f"{param}: {what} is not supported by this server{'; ' + instead if instead else ''}.",
                    "invalid_request_error", param, "unsupported_parameter")


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    """A decoded JSON body -> `model`, or a 400 `APIError` naming the first bad field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # The deepest error says most (a union reports each of its branches: a content part of an unknown
        # type fails both as a str and, further in, as a part); union branch tags leave the field path.
        first = max(e.errors(), key=lambda error: len(error["loc"]))
        where = ".".join(str(p) for p in first["loc"] if not _branch_tag(p))
        message = first["msg"].removeprefix("Value error, ")
        raise bad_request(f"{where or 'body'}: {message}.", where or None) from None


def _branch_tag(part) -> bool:
    """Whether a pydantic error location part names a union's branch (`str`, `list[int]`, `ImageURL`)
    rather than a field or an index."""
    text = str(part)
    return not isinstance(part, int) and ("[" in text or text[:1].isupper() or text in ("str", "int", "float", "bool"))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One answer's settings. max_tokens: None = until the slot is full; max_tokens_default: max_tokens is
    the route's default, not the client's (cut to what the slot holds, where a client's is refused beyond
    it); max_tokens_param: the request's name for it, and no_limit: how that route asks for no limit
    (None: it cannot), both for the error of a limit past the context; seed: None = a random one;
    ignore_eos: generate until max_tokens (benchmarks)."""

    max_tokens: int | None = None
    max_tokens_default: bool = False
    max_tokens_param: str = "max_tokens"
    no_limit: str | None = "leave max_tokens out"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        bad = sampling_error(self.temperature, self.top_p, self.top_k, self.repetition_penalty)
        if bad is not None:
            raise bad_request(bad[1], bad[0])
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1 (got {self.max_tokens}).", "max_tokens")


def _stop(stop: str | list[str] | None, param: str = "stop") -> tuple[str, ...]:
    strings = [stop] if isinstance(stop, str) else list(stop or ())
    if len(strings) > MAX_STOP_STRINGS:
        raise bad_request(f"{param} has {len(strings)} strings; at most {MAX_STOP_STRINGS} are allowed.", param)
    return tuple(s for s in strings if s)


def _top_k(top_k: int | None) -> int:
    """OpenAI-style extra `top_k` and SGLang's: absent is off (as 0 and -1 are)."""
    return 0 if top_k is None else top_k


class _Body(BaseModel):
    """Unknown fields ignored; known ones strictly typed, as OpenAI's API checks them: a bool is no
    number, a number no bool, and a string neither ("1", "yes" are refused, not converted)."""

    model_config = ConfigDict(extra="ignore", strict=True)


# -- OpenAI ---------------------------------------------------------------------------------------------
class StreamOptions(_Body):
    """OpenAI's `include_usage`, and vLLM's `continuous_usage_stats` (usage in every chunk, and a chunk
    for every step that produced tokens, text or not: how a load generator times tokens)."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _OpenAIBody(_Body):
    """The fields chat and completions share."""

    model: str | None = None
    stream: bool | None = False  # (null: false, as OpenAI's API takes it)
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    # extra fields, as vLLM and SGLang accept them
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    # extra fields of vLLM's and SGLang's that this server does not implement: refused when set, rather than
    # ignored as unknown fields are (an answer that looks right but was never constrained)
    min_p: Any = None
    min_tokens: Any = None
    stop_token_ids: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    use_beam_search: Any = None
    regex: Any = None
    ebnf: Any = None
    json_schema: Any = None
    structural_tag: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    def _refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        for name in ("regex", "ebnf", "json_schema", "structural_tag", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "structured_outputs"):
            if getattr(self, name) not in (None, "", [], {}):
                raise not_supported(name, "constrained decoding")
        for name, what, instead in (("min_p", "a non-zero min_p", "use top_p or top_k"),
                                    ("min_tokens", "a non-zero min_tokens", ""),
                                    ("stop_token_ids", "stop_token_ids", "use stop strings"),
                                    ("bad_words", "bad_words", ""),
                                    ("allowed_token_ids", "allowed_token_ids", ""),
                                    ("use_beam_search", "beam search", "")):
            if getattr(self, name) not in (None, 0, 0.0, False, [], ""):
                raise not_supported(name, what, instead)
        if self.n is not None and self.n < 1:
            raise bad_request(f"n must be at least 1 (got {self.n}).", "n")
        if self.n not in (None, 1):
            raise not_supported("n", f"n={self.n} (several choices per request)", "send n=1 and repeat the request")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise not_supported(name, "a non-zero " + name, "use repetition_penalty")
        if self.logit_bias:
            raise not_supported("logit_bias", "logit_bias")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            raise not_supported("logprobs" if self.logprobs not in (None, False, 0) else "top_logprobs",
                                "returning logprobs")

    def sampling(self, max_tokens: int | None = None) -> Sampling:
        self._refuse_unsupported()
        return Sampling(
            max_tokens=max_tokens if max_tokens is not None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=_top_k(self.top_k),
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, stop=_stop(self.stop), ignore_eos=bool(self.ignore_eos))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ContentPart(_Body):
    """A part of a message's content: `{"type": "text", "text"}` or `{"type": "image_url", "image_url":
    {"url"}}` (a bare string for `image_url` is accepted too)."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ("text", "image_url"):
            raise ValueError(f"content part type {value!r} is not supported; use 'text' or 'image_url'")
        return value


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatCompletionRequest(_OpenAIBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None

    def sampling(self, max_tokens: int | None = None) -> Sampling:
        sent = {"tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none"),
                "functions": bool(self.functions), "function_call": self.function_call not in (None, "none")}
        if any(sent.values()):
            raise not_supported(next(name for name, on in sent.items() if on), "tool and function calling")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise not_supported("response_format", f"response_format {self.response_format.get('type')!r}",
                                "only {'type': 'text'} is")
        if self.audio is not None or (self.modalities and set(self.modalities) - {"text"}):
            raise not_supported("modalities" if self.audio is None else "audio", "output other than text")
        if self.prediction is not None:
            raise not_supported("prediction", "predicted outputs")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:  # (named as it was sent)
            raise bad_request(f"max_completion_tokens must be at least 1 (got {self.max_completion_tokens}).",
                              "max_completion_tokens")
        sampling = super().sampling(limit)
        if self.max_completion_tokens is not None:
            sampling = dataclasses.replace(sampling, max_tokens_param="max_completion_tokens",
                                           no_limit="leave max_completion_tokens and max_tokens out")
        return sampling

    def conversation(self) -> tuple[list[dict], list[str]]:
        """The messages as this package's conversation (`processor.Processor.__call__`) and the image
        references in placeholder order. Within a message, parts join with a newline and each image part
        becomes an `<image>` placeholder where it stands (`[image, text]` -> "<image>\\ntext", the
        official prompts' layout)."""
        if not self.messages:
            raise bad_request("messages is empty; send at least one message.", "messages")
        turns, images = [], []
        for i, message in enumerate(self.messages):
            role = ROLES.get(message.role)
            if role is None:
                raise bad_request(f"messages.{i}.role {message.role!r} is not supported; use system (or developer), "
                                  f"user or assistant (tool messages are not supported).", f"messages.{i}.role")
            content = message.content
            if content is None:
                why = " (tool calls are not supported)" if role == "assistant" else ""
                raise bad_request(f"messages.{i}.content is missing{why}.", f"messages.{i}.content")
            if isinstance(content, list):
                pieces = []
                for j, part in enumerate(content):
                    where = f"messages.{i}.content.{j}"
                    if part.type == "text":
                        if part.text is None:
                            raise bad_request(f"{where}.text is missing.", f"{where}.text")
                        pieces.append(part.text)
                    else:
                        if role != "user":  # (as the official template: images only in user turns)
                            raise bad_request(f"{where}: an image_url part may only be in a user message, not in "
                                              f"the {message.role} message.", where)
                        url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                        if not url:
                            raise bad_request(f"{where}.image_url.url is missing.", f"{where}.image_url")
                        pieces.append(IMAGE_TOKEN)
                        images.append(url)
                content = "\n".join(pieces)
            turns.append({"role": role, "content": content})
        return turns, images


COMPLETIONS_MAX_TOKENS = 16  # /v1/completions' max_tokens when a request sets none


class CompletionRequest(_OpenAIBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def sampling(self, max_tokens: int | None = None) -> Sampling:
        if self.echo:
            raise not_supported("echo", "echo")
        if self.suffix:
            raise not_supported("suffix", "suffix (insertion)")
        if self.best_of not in (None, 1):
            raise not_supported("best_of", f"best_of={self.best_of}")
        sampling = dataclasses.replace(super().sampling(max_tokens), no_limit=None)  # (None means 16 here)
        if sampling.max_tokens is None:  # OpenAI's default here (chat's is none), as vLLM and SGLang keep it
            sampling = dataclasses.replace(sampling, max_tokens=COMPLETIONS_MAX_TOKENS, max_tokens_default=True)
        return sampling

    def single_prompt(self) -> str | list[int]:
        """The one prompt: text (no chat template is applied) or token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise not_supported("prompt", f"a batch of {len(prompt)} prompts", "send one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise bad_request("prompt is empty.", "prompt")
        if isinstance(prompt, str) and IMAGE_TOKEN in prompt:
            raise bad_request(f"the prompt holds {IMAGE_TOKEN}, an image's placeholder, and /v1/completions takes no "
                              "images; send images to /v1/chat/completions (image_url parts) or /generate "
                              "(image_data).", "prompt")
        return prompt


# -- SGLang -----------------------------------------------------------------------------------------------
class SGLangSamplingParams(_Body):
    """SGLang's `sampling_params`, with its defaults (max_new_tokens 128, temperature 1)."""

    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    n: int = 1
    min_new_tokens: int = 0
    seed: int | None = None
    sampling_seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None

    def sampling(self) -> Sampling:
        p = "sampling_params."
        if self.n < 1:
            raise bad_request(f"{p}n must be at least 1 (got {self.n}).", p + "n")
        if self.n != 1:
            raise not_supported(p + "n", f"n={self.n}", "send n=1 and repeat the request")
        for name in ("min_p", "frequency_penalty", "presence_penalty", "min_new_tokens"):
            if getattr(self, name):
                raise not_supported(p + name, "a non-zero " + name)
        if self.stop_token_ids:
            raise not_supported(p + "stop_token_ids", "stop_token_ids", "use stop strings")
        for name in ("json_schema", "regex", "ebnf", "structural_tag"):
            if getattr(self, name) is not None:
                raise not_supported(p + name, "constrained decoding")
        seed = self.sampling_seed if self.sampling_seed is not None else self.seed
        if self.max_new_tokens is not None and self.max_new_tokens < 1:  # (named as this route names it)
            raise bad_request(f"{p}max_new_tokens must be at least 1 (got {self.max_new_tokens}).", p + "max_new_tokens")
        bad = sampling_error(self.temperature, self.top_p, _top_k(self.top_k), self.repetition_penalty)
        if bad is not None:  # (named as this route names it)
            raise bad_request(p + bad[1], p + bad[0])
        return Sampling(max_tokens=self.max_new_tokens, max_tokens_default="max_new_tokens" not in self.model_fields_set,
                        max_tokens_param=p + "max_new_tokens", no_limit=f"send {p}max_new_tokens: null",
                        temperature=self.temperature, top_p=self.top_p,
                        top_k=_top_k(self.top_k), repetition_penalty=self.repetition_penalty, seed=seed,
                        stop=_stop(self.stop, p + "stop"), ignore_eos=bool(self.ignore_eos))


class GenerateRequest(_Body):
    """SGLang's `POST /generate` body (one request: `text` with `<image>` placeholders and `image_data`
    for them, or `input_ids` without images)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    image_data: str | list[str] | list[list[str]] | None = None
    sampling_params: SGLangSamplingParams | list[SGLangSamplingParams] | None = None
    stream: bool | None = False
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    input_embeds: Any = None

    def sampling(self) -> Sampling:
        if self.return_logprob:
            raise not_supported("return_logprob", "returning logprobs")
        params = self.sampling_params
        if isinstance(params, list):
            if len(params) != 1:
                raise not_supported("sampling_params", "a batch of sampling_params", "send one request at a time")
            params = params[0]
        return (params or SGLangSamplingParams()).sampling()

    def single_prompt(self) -> tuple[str | list[int], list[str]]:
        """(text or token ids, image references)."""
        if self.input_embeds is not None:
            raise not_supported("input_embeds", "input_embeds")
        if (self.text is None) == (self.input_ids is None):
            raise bad_request("give exactly one of text and input_ids.", "text")
        prompt = self.text if self.text is not None else self.input_ids
        if self.batched:
            if len(prompt) != 1:
                raise not_supported("text" if self.text is not None else "input_ids", f"a batch of {len(prompt)} prompts",
                                    "send one request at a time")
            prompt = prompt[0]
        if not prompt:
            raise bad_request("the prompt is empty.", "text" if self.text is not None else "input_ids")
        if isinstance(self.rid, list) and len(self.rid) != 1:
            raise bad_request(f"rid has {len(self.rid)} ids for the one prompt; give one.", "rid")
        images = self.image_data
        if isinstance(images, str):
            images = [images]
        images = list(images or [])
        if images and isinstance(images[0], list):  # a batch of one request's image lists
            if len(images) != 1:
                raise not_supported("image_data", "a batch of image lists", "send one request at a time")
            images = list(images[0])
        if images and not isinstance(prompt, str):
            raise bad_request(f"image_data needs text with one {IMAGE_TOKEN} placeholder per image, not input_ids.",
                              "image_data")
        return prompt, images

    @property
    def batched(self) -> bool:
        """Whether the prompt came as a batch (of one): SGLang answers a batch with a list."""
        prompt = self.text if self.text is not None else self.input_ids
        return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))

    @property
    def request_id(self) -> str | None:
        return self.rid[0] if isinstance(self.rid, list) and self.rid else self.rid if isinstance(self.rid, str) else None


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "GenerateRequest", "Sampling", "parse"]
