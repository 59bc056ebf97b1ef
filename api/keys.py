"""The router's API keys (router.api_keys): which key may use which model.

Owns the check of a request's Authorization header and the question "may this key use that
model". Keys are kept only as sha256 digests and every key is compared, in constant time, so
neither memory nor timing says which key matched. Not here: how a refusal is answered (the
typed errors go through api/errors.py like any other).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from ..daemon.config.schema import RouterConfig
from ..daemon.models.supervisor import Supervisor
from .refusals import InvalidApiKey

EVERY_MODEL = None  # a key whose models include "*"


@dataclass(frozen=True)
class KeyAccess:
    digest: bytes  # sha256 of the key: compared in constant time, the key itself is not kept
    models: frozenset[str] | None  # model names (aliases resolved); EVERY_MODEL for "*"


class ApiKeys:
    """router.api_keys: who may use which model. Empty: the router is open."""

    def __init__(self, config: RouterConfig, supervisor: Supervisor) -> None:
        self.keys = []
        for key in config.api_keys:
            models = EVERY_MODEL if "*" in key.models else frozenset(supervisor.resolve(m).spec.name for m in key.models)
            self.keys.append(KeyAccess(hashlib.sha256(key.secret().encode()).digest(), models))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, authorization: bytes) -> KeyAccess:
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise InvalidApiKey("this router needs 'Authorization: Bearer <API key>' (router.api_keys)")
        digest = hashlib.sha256(given.strip()).digest()
        found = None
        for key in self.keys:  # every key is compared, so the time says nothing about which matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise InvalidApiKey("the API key is not valid")
        return found


def allows(access: KeyAccess | None, model: str) -> bool:
    return access is None or access.models is EVERY_MODEL or model in access.models
