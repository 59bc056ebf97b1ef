"""The built-in engine's OpenAI request bodies, read and checked before anything runs.

Every client mistake is a `BadRequest` naming the field by its path (`messages[2].content[0].type`),
which the server answers as a 400 in OpenAI's envelope: never a 500, never a traceback. The body's
nesting is bounded (a JSON parser recurses, and so would anything that walks the body). Fields
OpenAI defines that this engine does not use (user, presence_penalty, logprobs...) are accepted
and ignored, as vLLM does. No torch here: the checks run before a request takes a slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 64  # levels of objects and lists in a body; OpenAI's deepest real body has under 10
ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "developer": "system"}  # OpenAI's newer name for the system role; chat templates know the old one
MAX_TOKENS = 1 << 31
SEEDS = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


class BadRequest(Exception):
    """A client's mistake; `param` is the field's path (None: the body as a whole)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


@dataclass(frozen=True)
class Generate:
    """A chat or completion request, checked: `messages` (role, text) for a chat, `prompt` otherwise.
    `max_tokens` is None when the client left it to the room in the context."""

    messages: tuple[dict[str, str], ...] | None
    prompt: str | None
    max_tokens: int | None
    max_tokens_param: str
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool
    stream: bool

    def sampling(self, prompt_tokens: int, context_tokens: int) -> Sampling:
        """The sampling for a prompt of `prompt_tokens`, or BadRequest where it leaves no room."""
        room = context_tokens - prompt_tokens
        field = "messages" if self.messages is not None else "prompt"
        if room < 1:
            raise BadRequest(field, f"the prompt has {prompt_tokens} tokens; this engine's context is "
                             f"{context_tokens} tokens per sequence: shorten the prompt")
        if self.max_tokens is not None and self.max_tokens > room:
            raise BadRequest(self.max_tokens_param, f"{self.max_tokens} tokens asked, but the prompt's "
                             f"{prompt_tokens} tokens leave {room} of this engine's {context_tokens} tokens "
                             f"per sequence: ask for at most {room}")
        return Sampling(self.max_tokens or room, self.temperature, self.top_p, self.stop, self.seed, self.ignore_eos)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, no deeper than MAX_DEPTH."""
    try:
        body = json.loads(raw)
    except RecursionError:  # deeper than the parser's own limit (~1000): too deep either way
        raise BadRequest(None, f"the body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(None, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(None, f"the body must be a JSON object, not {_json_type(body)}")
    flaw = _flaw(body)
    if flaw is not None:
        raise BadRequest(*flaw)
    return body


def _flaw(body: Any) -> tuple[str, str] | None:
    """(the path, its first three steps; what is wrong) of a value nested below MAX_DEPTH levels,
    or of a string that is not text (a lone UTF-16 surrogate, which JSON's \\u escapes can spell
    and no tokenizer reads); None when there is none. A loop with a stack of its own, not recursion:
    the body may be as deep as the parser allowed."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        children = (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list)
                    else ())
        for key, child in children:
            step = f"[{key}]" if isinstance(value, list) else (f".{key}" if path else str(key))
            child_path = path + step if depth <= 3 else path
            if isinstance(child, str):
                if not child.isascii() and _not_text(child):
                    return child_path, "holds a lone UTF-16 surrogate, which is not text"
            elif isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    return child_path, f"nested deeper than {MAX_DEPTH} levels; no field of a request is"
                stack.append((child, depth + 1, child_path))
    return None


def _not_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def chat_request(body: dict[str, Any]) -> Generate:
    return _generate(body, messages=_messages(body.get("messages")), prompt=None)


def completion_request(body: dict[str, Any]) -> Generate:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt", f"must be a non-empty string (or a list of one); got {_shown(prompt)}")
    return _generate(body, messages=None, prompt=prompt)


def _generate(body: dict[str, Any], messages: tuple[dict[str, str], ...] | None, prompt: str | None) -> Generate:
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise BadRequest("n", f"only n=1 is supported by the built-in engine; got {_shown(body.get('n'))}")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1, MAX_TOKENS, f"a positive integer (at most {MAX_TOKENS})")
    seed = _integer(body, "seed", *SEEDS, f"an integer from {SEEDS[0]} to {SEEDS[1]}")
    return Generate(messages, prompt, max_tokens, name, _number(body, "temperature", 1.0, 0.0, 2.0),
                    _number(body, "top_p", 1.0, 0.0, 1.0), _stop(body.get("stop")), seed,
                    _flag(body, "ignore_eos"), _flag(body, "stream"))


def _messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", f"must be a non-empty list of {{role, content}} objects; got {_shown(messages)}")
    return tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))


def _message(message: Any, path: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise BadRequest(path, f"must be a {{role, content}} object; got {_shown(message)}")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadRequest(f"{path}.role", f"must be one of {', '.join(ROLES)}; got {_shown(role)}")
    return {"role": ROLES[role], "content": _content(message.get("content"), f"{path}.content")}


def _content(content: Any, path: str) -> str:
    """A string, or OpenAI's list of content parts, whose text parts are joined with newlines (as vLLM does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(path, f"must be a string or a list of text parts; got {_shown(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequest(f"{path}[{j}]", f"must be a content part {{type, text}}; got {_shown(part)}")
        if part.get("type") != "text":
            raise BadRequest(f"{path}[{j}].type", f"the built-in engine reads text parts only (type 'text'); "
                             f"got {_shown(part.get('type'))}")
        if not isinstance(part.get("text"), str):
            raise BadRequest(f"{path}[{j}].text", f"must be a string; got {_shown(part.get('text'))}")
        texts.append(part["text"])
    return "\n".join(texts)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(name, f"must be a number from {low:g} to {high:g}; got {_shown(value)}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int, wanted: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(name, f"must be {wanted}; got {_shown(value)}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(name, f"must be true or false; got {_shown(value)}")
    return value


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop", f"must be a non-empty string or a list of them; got {_shown(stop)}")
    return tuple(stops)


def _shown(value: Any, limit: int = 60) -> str:
    """A client's value as the error quotes it: its JSON, cut short (a body can be megabytes)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = _json_type(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
