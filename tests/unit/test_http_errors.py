"""One error map (api/errors.py): every typed error has a status and an OpenAI type, and the
admin API's envelope and the router's OpenAI envelope are two renderings of the same row."""

import inspect
import logging
import sys

import pytest

from lessor.api import errors, refusals
from lessor.api.logfilter import ClientMistakes, install_client_mistakes
from lessor.api.refusals import BodyTooLarge, InvalidApiKey, MethodNotAllowed, NoRoute, RequestTimedOut
from lessor.daemon import errors as typed
from lessor.daemon.errors import InvalidRequest, Unauthorized, UnknownModel
from lessor.daemon.ledger import ledger_errors
from lessor.daemon.models import load_errors
from lessor.daemon.models.load_errors import ModelBusy
from lessor.daemon.planning import rejections
from lessor.daemon.planning.rejections import ModelsBusy
from lessor.daemon.traffic import request_errors
from lessor.daemon.traffic.request_errors import Forbidden, QueueFull


def test_every_typed_error_has_a_row():
    classes = [c for module in (typed, rejections, load_errors, request_errors, ledger_errors, refusals)
               for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, typed.LessorError) and c is not typed.LessorError]
    assert [c.__name__ for c in classes if errors.row(c) is errors.UNMAPPED] == []


def test_a_409_is_a_conflict_in_openai_terms_and_says_when_to_retry():
    busy = ModelBusy("a", "loading")
    assert errors.http_status(busy) == 409
    assert errors.openai_envelope(busy)["error"] == {"message": "model 'a' is loading; retry when that finishes",
                                                     "type": "conflict_error", "param": None, "code": "model_busy"}
    assert errors.http_headers(busy) == {"Retry-After": "2"}


@pytest.mark.parametrize("exc", [
    InvalidRequest("model", "required"), UnknownModel("gpt-9", ["a"]), Forbidden("b", ("a",)),
    QueueFull("a", 4), ModelsBusy("a", "gpu0", 10, 5), BodyTooLarge(4096, "router.max_body"),
    RequestTimedOut(30.0, "router.request_timeout"), NoRoute("GET", "/x", "the router", ("/v1/models",)),
])
def test_both_envelopes_render_one_row(exc):
    ours, openai = errors.lessor_envelope(exc)["error"], errors.openai_envelope(exc)["error"]
    assert ours["type"] == openai["code"] == exc.type
    assert ours["message"] == openai["message"] == exc.message()
    assert ours.get("field") == openai["param"]
    assert openai["type"] == errors.mapping(exc).openai_type


def test_the_router_and_the_admin_api_challenge_for_their_own_credentials():
    router, admin = InvalidApiKey("the API key is not valid"), Unauthorized("the bearer token is wrong")
    assert errors.http_status(router) == errors.http_status(admin) == 401
    assert errors.http_headers(router) == {"WWW-Authenticate": 'Bearer realm="lessor"'}
    assert errors.http_headers(admin) == {"WWW-Authenticate": 'Bearer realm="lessor-admin"'}
    assert errors.openai_envelope(router)["error"]["code"] == "invalid_api_key"
    assert errors.lessor_envelope(admin)["error"]["type"] == "unauthorized"


def test_a_wrong_method_names_the_methods_that_work():
    exc = MethodNotAllowed("DELETE", "/v1/models", ("GET",))
    assert errors.http_status(exc) == 405 and errors.http_headers(exc) == {"Allow": "GET"}
    assert exc.message() == "/v1/models takes GET, not DELETE"


def test_malformed_requests_are_one_info_line_not_a_traceback(caplog):
    from aiohttp.http_exceptions import BadHttpMessage

    try:
        raise BadHttpMessage("Invalid method encountered:\n\n  b'GARBAGE'")
    except BadHttpMessage:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", None,
                                   exc_info=sys.exc_info())
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "something else", None, None)
    with caplog.at_level(logging.INFO, logger="lessor.api"):
        assert ClientMistakes().filter(record) is False and ClientMistakes().filter(other) is True
    assert [r.getMessage() for r in caplog.records] == ["admin API: malformed request answered 400: "
                                                        "Invalid method encountered:"]
    name = "lessor.test.client_mistakes"
    assert install_client_mistakes(name) is install_client_mistakes(name)  # installed once
    assert len(logging.getLogger(name).filters) == 1
