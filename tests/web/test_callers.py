"""Unit tests of bbworker.web.callers: bearer tokens, CORS headers, request ids, client addresses.
The live server's behaviour is in tests/live/test_client_api.py; parse_tokens and parse_origins
(bbworker.settings) are in tests/test_settings.py."""
import os
import re
import time
import uuid

import pytest

from bbworker.settings import parse_origins
from bbworker.web.callers import CorsPolicy, TokenAuth, TrustedProxies, client_address, request_id, trace_id


# ---------------------------------------------------------------- auth

def test_no_tokens_means_no_auth():
    auth = TokenAuth()
    assert not auth.enabled and auth.allows(None) and auth.allows("Bearer whatever")


@pytest.mark.parametrize("header, ok", [
    ("Bearer s3cret", True), ("bearer s3cret", True), ("Bearer  s3cret ", True), ("Bearer other", True),
    ("Bearer s3cre", False), ("Bearer s3cret2", False), ("Basic s3cret", False), ("s3cret", False),
    ("Bearer", False), ("", False), (None, False), ("Bearer \u00e9t\u00e9", False)])
def test_bearer_tokens_are_checked(header, ok):
    assert TokenAuth(["s3cret", "other"]).allows(header) is ok


def test_token_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("first\n")
    auth = TokenAuth(["fixed"], str(path))
    assert auth.enabled and auth.allows("Bearer first") and auth.allows("Bearer fixed")
    path.write_text("# rotated\nsecond\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    assert auth.allows("Bearer second") and not auth.allows("Bearer first") and auth.allows("Bearer fixed")


def test_token_file_fails_closed_and_keeps_the_last_tokens_when_unreadable(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("")
    auth = TokenAuth([], str(path))
    assert auth.enabled and not auth.allows("Bearer ") and not auth.allows("Bearer anything")
    path.write_text("kept\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert auth.allows("Bearer kept")
    path.unlink()
    assert auth.allows("Bearer kept") and not auth.allows("Bearer other")


# ---------------------------------------------------------------- CORS

def _environ(**headers):
    return {"HTTP_" + k.upper(): v for k, v in headers.items()}


def test_preflight_lists_methods_headers_and_max_age():
    policy = CorsPolicy(parse_origins("https://app.example"))
    env = _environ(origin="https://app.example", access_control_request_method="POST")
    assert policy.is_preflight("OPTIONS", env) and not policy.is_preflight("POST", env)
    headers = dict(policy.preflight(env, {"POST"}))
    assert headers["Access-Control-Allow-Origin"] == "https://app.example" and headers["Vary"] == "Origin"
    assert headers["Access-Control-Allow-Methods"] == "POST"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "authorization", "accept"} <= allowed
    assert int(headers["Access-Control-Max-Age"]) >= 600


def test_preflight_refuses_other_origins_and_methods():
    policy = CorsPolicy(parse_origins("https://app.example"))
    other = _environ(origin="https://evil.example", access_control_request_method="POST")
    assert "Access-Control-Allow-Origin" not in dict(policy.preflight(other, {"POST"}))
    wrong_method = _environ(origin="https://app.example", access_control_request_method="DELETE")
    assert "Access-Control-Allow-Origin" not in dict(policy.preflight(wrong_method, {"POST"}))


def test_replies_carry_the_origin_and_expose_headers():
    env = _environ(origin="https://app.example")
    headers = dict(CorsPolicy("*").reply_headers(env))
    assert headers["Access-Control-Allow-Origin"] == "*"
    exposed = {h.strip() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-Public-Inputs", "X-Request-Id", "Retry-After", "ETag"} <= exposed
    assert CorsPolicy(None).reply_headers(env) == [] and not CorsPolicy(None).is_preflight("OPTIONS", env)
    assert dict(CorsPolicy(parse_origins("https://x.example")).reply_headers(env)) == {"Vary": "Origin"}


# ---------------------------------------------------------------- request ids

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("inbound", ["abc", "A" * 128, "req-1.2_3~x:y/z+w=@q", "../x", str(uuid.uuid4())])
def test_safe_inbound_request_ids_are_kept(inbound):
    assert request_id(_environ(x_request_id=inbound, traceparent=f"00-{TRACE}-00f067aa0ba902b7-01")) == inbound


@pytest.mark.parametrize("inbound", ["", "A" * 129, "a b", "a\nb", "a;b", "a,b", "é", "a\x00", '"a"'])
def test_unsafe_request_ids_fall_back_to_traceparent_or_uuid(inbound):
    assert request_id(_environ(x_request_id=inbound, traceparent=f"00-{TRACE}-00f067aa0ba902b7-01")) == TRACE
    assert uuid.UUID(request_id(_environ(x_request_id=inbound))).version == 4


@pytest.mark.parametrize("header, expected", [
    (f"00-{TRACE}-00f067aa0ba902b7-01", TRACE),
    (f"01-{TRACE}-00f067aa0ba902b7-01-future", TRACE),  # a later version may append fields
    (f"00-{TRACE}-00f067aa0ba902b7-01-x", None), (f"ff-{TRACE}-00f067aa0ba902b7-01", None),
    (f"00-{'0' * 32}-00f067aa0ba902b7-01", None), (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None), ("garbage", None), ("", None)])
def test_traceparent(header, expected):
    assert trace_id(header) == expected


def test_request_ids_never_repeat_without_inbound_ids():
    ids = {request_id({}) for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in ids)


# ---------------------------------------------------------------- client addresses

@pytest.mark.parametrize("peer, forwarded, trusted, expected", [
    ("203.0.113.9", "", "127.0.0.1,::1", "203.0.113.9"),
    ("203.0.113.9", "198.51.100.1", "127.0.0.1,::1", "203.0.113.9"),  # untrusted peer: header ignored
    ("127.0.0.1", "198.51.100.1", "127.0.0.1,::1", "198.51.100.1"),
    ("127.0.0.1", "6.6.6.6, 198.51.100.1", "127.0.0.1", "198.51.100.1"),  # the client cannot forge the hop
    ("10.0.0.5", "198.51.100.1, 10.0.0.7", "10.0.0.0/8", "198.51.100.1"),  # chained trusted proxies
    ("10.0.0.5", "garbage, 10.0.0.7", "10.0.0.0/8", "10.0.0.7"),
    ("10.0.0.5", "2001:db8::1", "*", "2001:db8::1"),
    ("::1", "198.51.100.1", "127.0.0.1,::1", "198.51.100.1"),
])
def test_client_address(peer, forwarded, trusted, expected):
    env = {"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}
    assert client_address(env, TrustedProxies(trusted)) == expected
