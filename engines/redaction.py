"""What a reader without the admin token may not see: secrets in an engine's command line, its
environment and lessord's own, wherever they surface in text (a failed load's error quotes the
engine log's last lines; an engine may print its arguments and environment, as vLLM prints its
non-default args). Pure functions, no I/O: the admin API applies them to what it answers a caller
without the token, the MQTT publisher to what it sends, process.py to its DEBUG line.

The rule, in two parts:
- By name. A flag or variable name is secret when one of its words (split at - _ . and case) is
  key, keys, token, secret, secrets, password, passwd, pass, credential, credentials, auth, cookie
  or ends with key, token, secret or password (apikey, pgpassword). In text, the value after such
  a flag (`--api-key VALUE`, `--api-key=VALUE`), after `NAME=` and in `'name': 'value'` (a printed
  dict) is redacted, and so is a URL's password (`scheme://user:PASSWORD@host`).
- By value. The values the config and lessord's environment hold as secret are redacted wherever
  they appear: every value of a model's `engine.env`, the values after secret flags in its
  `engine.extra_args`, and lessord's own variables with secret names. A value shorter than
  MIN_VALUE characters is not searched for (it would blank ordinary words and numbers); the
  name rule still hides it where it is printed with its name.
Not here: who is shown what (api/admin.py decides: the token holder reads the whole text).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

REDACTED = "<redacted>"
MIN_VALUE = 6

WORDS = frozenset(("key", "keys", "token", "secret", "secrets", "password", "passwd", "pass", "credential",
                   "credentials", "auth", "cookie"))
ENDINGS = ("key", "token", "secret", "password")
_SPLIT = re.compile(r"[-_.\s]+|(?<=[a-z])(?=[A-Z])")

_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w.-]*)(=|[ \t]+)(?!-)(\S+)")
_ASSIGN = re.compile(r"(?<![\w-])([A-Za-z_][\w.]*)=(['\"]?)([^\s'\",;)]+)")
_PAIR = re.compile(r"""(['"])([\w.-]+)\1(\s*[:=]\s*)(['"])(.*?)\4""")
_COLON = re.compile(r"(?<![\w-])([A-Za-z_][\w.-]*)(:[ \t]*)(?!//)(['\"]?)([^\s'\",;)\]}]+)")  # YAML, headers: `HF_TOKEN: x`
_PAIR_LIST = re.compile(r"""(['"])([\w.-]+)\1(\s*[:=]\s*)\[([^\]]*)\]""")  # a printed dict's list: `'api_key': ['x']`
_BEARER = re.compile(r"(?i)\b(bearer[ \t]+)([^\s'\",;]+)")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)([^\s@/]+)(@)")


def secret_name(name: str) -> bool:
    """Whether a flag (`--hf-token`) or variable (`HF_TOKEN`) name says its value is a secret."""
    words = [w.lower() for w in _SPLIT.split(name.lstrip("-")) if w]
    return any(w in WORDS or w.endswith(ENDINGS) for w in words)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv with the values of secret flags replaced: `--api-key X` and `--api-key=X`."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:  # whatever it looks like: a key may begin with "-"
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        flag, eq, _ = arg.partition("=")
        if arg.startswith("-") and secret_name(flag):
            out.append(f"{flag}={REDACTED}" if eq else arg)
            hide_next = not eq
        else:
            out.append(arg)
    return out


def argv_secrets(argv: Sequence[str]) -> set[str]:
    """The values redact_argv hides."""
    hidden = set()
    for arg, shown in zip(argv, redact_argv(argv)):
        if arg != shown:
            hidden.add(arg.partition("=")[2] if shown.endswith(f"={REDACTED}") else arg)
    return hidden


def secrets_of(models: Iterable[Any], environ: Mapping[str, str]) -> frozenset[str]:
    """The values to hide wherever they appear: each model's `engine.env` values and the values after
    secret flags in its `engine.extra_args` (models: the config's specs), lessord's own secret-named
    variables."""
    found: set[str] = {value for name, value in environ.items() if secret_name(name)}
    for spec in models:
        engine = getattr(spec, "engine", None)
        found.update(getattr(engine, "env", {}).values())
        found.update(argv_secrets(getattr(engine, "extra_args", ())))
    return frozenset(v for v in found if len(v.strip()) >= MIN_VALUE)


def _values_pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    # Longest first: a secret that holds another is hidden whole.
    ordered = sorted({s for s in secrets if len(s.strip()) >= MIN_VALUE}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


class Redactor:
    """redact() with its secrets compiled once (the admin API keeps one per config in force)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = frozenset(secrets)
        self._values = _values_pattern(self.secrets)

    def text(self, text: str) -> str:
        if self._values is not None:
            text = self._values.sub(REDACTED, text)
        text = _FLAG.sub(lambda m: m[0] if not secret_name(m[1]) or m[3] == REDACTED
                         else f"{m[1]}{m[2]}{REDACTED}", text)
        text = _ASSIGN.sub(lambda m: f"{m[1]}={m[2]}{REDACTED}" if secret_name(m[1]) else m[0], text)
        text = _PAIR.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{REDACTED}{m[4]}" if secret_name(m[2]) else m[0],
                         text)
        text = _PAIR_LIST.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}[{REDACTED}]" if secret_name(m[2]) else m[0], text)
        text = _COLON.sub(lambda m: m[0] if not secret_name(m[1]) or m[4] == REDACTED
                          else f"{m[1]}{m[2]}{m[3]}{REDACTED}", text)
        text = _BEARER.sub(lambda m: m[0] if m[2] == REDACTED else f"{m[1]}{REDACTED}", text)
        return _URL_PASSWORD.sub(lambda m: f"{m[1]}{REDACTED}{m[3]}", text)

    def data(self, data: Any) -> Any:
        """Every string in a JSON-like value redacted (dict keys are names lessor chose: kept)."""
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, dict):
            return {key: self.data(value) for key, value in data.items()}
        if isinstance(data, (list, tuple)):
            return [self.data(value) for value in data]
        return data


class Redacting:
    """A Redactor of the config in force (`current()`: lessord's config, duck-typed: its models and
    router keys) and `environ`, compiled again only when a reload swaps the config object."""

    def __init__(self, current: Callable[[], Any], environ: Mapping[str, str]) -> None:
        self._current, self._environ = current, environ
        self._config: Any = None
        self._redactor = Redactor(())

    def __call__(self, data: Any) -> Any:
        return self.redactor().data(data)

    def redactor(self) -> Redactor:
        config = self._current()
        if config is not self._config:
            keys = {key.key for key in config.router.api_keys if key.key}
            # The earlier configs' secrets too: an error recorded before a reload rotated a key quotes the old one.
            known = self._redactor.secrets | secrets_of(config.models, self._environ) | keys
            self._redactor, self._config = Redactor(known), config
        return self._redactor


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with `secrets` and every value the name rule finds replaced by REDACTED."""
    return Redactor(secrets).text(text)
