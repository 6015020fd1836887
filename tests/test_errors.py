"""bbworker.errors: the one error model. Each class's status, title, outcome and fault are a contract with
clients (the JSON body and status), the metrics (outcome) and the breaker (fault): pinned here as a table."""
import pytest

from bbworker import errors

# class: (status, title, outcome, fault, Retry-After or None)
CONTRACT = {
    errors.Error: (500, "Internal server error", "server_error", "server", None),
    errors.BadRequest: (400, "Bad request", "bad_request", "client", None),
    errors.Unauthorized: (401, "Unauthorized", None, "client", None),
    errors.NotFound: (404, "Not found", None, "client", None),
    errors.MethodNotAllowed: (405, "Method not allowed", None, "client", None),
    errors.RequestTimeout: (408, "Request timeout", "upload_timeout", "client", None),
    errors.UploadTooSlow: (408, "Request timeout", "upload_timeout", "client", None),
    errors.PayloadTooLarge: (413, "Payload too large", "too_large", "client", None),
    errors.ProofFailed: (422, "Proof generation failed", "rejected", "client", None),
    errors.ClientGone: (499, "Client closed request", "client_gone", "client", None),
    errors.ServiceUnavailable: (503, "Service unavailable", "unavailable", "server", 5),
    errors.NotReady: (503, "Service unavailable", "not_ready", "server", 5),
    errors.Busy: (503, "Service unavailable", "busy", None, 5),
    errors.ProverError: (500, "Internal server error", "crashed", "server", None),
    errors.ProverUnavailable: (500, "Internal server error", "unavailable", "server", None),
    errors.ProverTimeout: (504, "Proof generation timed out", "timeout", None, None),
    errors.VerifyTimeout: (504, "Proof verification timed out", "timeout", None, None),
    errors.BBExited: (500, "Internal server error", "crashed", "server", None),
    errors.ProverFailed: (422, "Proof generation failed", "rejected", "client", None),
    errors.ProverCrashed: (500, "Internal server error", "crashed", "server", None),
    errors.ServerFault: (500, "Internal server error", "server_error", "server", None),
    errors.ResourceUnavailable: (503, "Service unavailable", "unavailable", "server", 5),
    errors.CrsUnavailable: (503, "Service unavailable", "crs_unavailable", "server", 30),
    errors.ProverOutOfMemory: (500, "Internal server error", "out_of_memory", "server", None),
    errors.ProtocolError: (400, "Bad request", "bad_request", "client", None),
    errors.ProofRejected: (500, "Proof failed verification", "unverified", "server", None),
}

# what the client reads before the message
PREFIXES = {errors.ProverError: "bb crashed: ", errors.ProverUnavailable: "bb is not available: ",
            errors.ProverTimeout: "", errors.BBExited: "bb crashed: ", errors.ProverFailed: "bb prove failed: ",
            errors.ProverCrashed: "bb crashed: ", errors.ServerFault: "bb failed: ",
            errors.ResourceUnavailable: "a server resource failed: ", errors.CrsUnavailable: "the CRS is unavailable: ",
            errors.ProverOutOfMemory: "", errors.ProofRejected: ""}


def every_class(root=errors.Error):
    """`root` and every class below it that bbworker/errors.py defines."""
    found = [root]
    for sub in root.__subclasses__():
        found += every_class(sub)
    return [cls for cls in found if cls.__module__ == errors.__name__]


def make(cls, message="the message"):
    """An instance of `cls` with `message`, whatever its constructor's arguments."""
    if cls is errors.MethodNotAllowed:
        return cls("/api/x", ["POST"])
    if cls is errors.ProverOutOfMemory:
        return cls(-6, None)
    if issubclass(cls, errors.BBExited):
        return cls(1, message)
    return cls(message)


def test_the_contract_covers_every_class():
    assert set(every_class()) == set(CONTRACT)


@pytest.mark.parametrize("cls", list(CONTRACT), ids=lambda cls: cls.__name__)
def test_status_title_outcome_fault_and_retry_after(cls):
    status, title, outcome, fault, retry_after = CONTRACT[cls]
    error = make(cls)
    assert (error.status, error.title, error.outcome, error.fault, error.retry_after) == \
        (status, title, outcome, fault, retry_after)
    assert (cls.status, cls.title, cls.outcome, cls.fault) == (status, title, outcome, fault)  # on the class too
    assert isinstance(error, Exception)


def test_prover_errors_carry_a_returncode_where_bb_ran_to_the_end():
    assert errors.ProverUnavailable("gone").returncode is None
    assert errors.ProverTimeout("slow").returncode is None
    failed = errors.ProverFailed(1, "bad witness")
    assert (failed.returncode, failed.reason, failed.message, str(failed)) == (1, "bad witness", "bad witness",
                                                                              "bad witness")
    assert all(issubclass(cls, errors.ProverError) for cls in every_class(errors.BBExited))


# ---------------------------------------------------------------- detail: prefix + message

@pytest.mark.parametrize("cls", list(PREFIXES), ids=lambda cls: cls.__name__)
def test_detail_is_the_prefix_then_the_message(cls):
    error = make(cls)
    assert error.prefix == PREFIXES[cls]
    assert error.detail == PREFIXES[cls] + error.message


def test_detail_of_the_request_errors_is_the_message():
    for cls in every_class():
        if not issubclass(cls, errors.ProverError):
            error = make(cls)
            assert error.prefix == "" and error.detail == error.message, cls


def test_details_as_the_client_reads_them():
    assert errors.ProverFailed(1, "the witness does not satisfy the circuit's constraints").detail == \
        "bb prove failed: the witness does not satisfy the circuit's constraints"
    assert errors.ProverUnavailable("/app/bb: not executable").detail == "bb is not available: /app/bb: not executable"
    assert errors.CrsUnavailable(1, "HTTP request failed").detail == "the CRS is unavailable: HTTP request failed"
    assert errors.ProverOutOfMemory(-6, 512).detail == "bb ran out of memory (limit 512 MiB)"
    assert errors.ProverOutOfMemory(-6, None).detail == "bb ran out of memory"
    assert errors.ProverOutOfMemory(-6, 512).limit_mb == 512
    assert errors.ClientGone().detail == "client disconnected"


# ---------------------------------------------------------------- headers

def test_no_headers_without_retry_after():
    assert errors.BadRequest("x").headers == []
    assert errors.ProverCrashed(0, "x").headers == []


@pytest.mark.parametrize("retry_after, header", [(None, "5"), (30, "30"), (12.4, "12"), (12.6, "13"), (0.2, "1"),
                                                 (0, "1"), (-3, "1")])
def test_retry_after_is_whole_seconds_and_at_least_1(retry_after, header):
    error = errors.ServiceUnavailable("x", retry_after=retry_after)
    assert error.headers == [("Retry-After", header)]


def test_retry_after_defaults_per_class_and_can_be_set_on_any_error():
    assert errors.CrsUnavailable(1, "x").headers == [("Retry-After", "30")]
    assert errors.ResourceUnavailable(1, "x").headers == [("Retry-After", "5")]
    assert errors.Busy("queue full").headers == [("Retry-After", "5")]
    assert errors.Busy("queue full", retry_after=7).headers == [("Retry-After", "7")]
    assert errors.ProverTimeout("slow", retry_after=2).headers == [("Retry-After", "2")]
    assert errors.ServiceUnavailable.retry_after == 5  # an instance's value does not change the class's


def test_extra_headers_come_first_and_extra_fields_are_kept():
    error = errors.Busy("x", retry_after=3, headers=[("X-Queue", "9")], extra={"queued": 9})
    assert error.headers == [("X-Queue", "9"), ("Retry-After", "3")]
    assert error.extra == {"queued": 9}
    assert errors.BadRequest("x").extra == {}


@pytest.mark.parametrize("invalid, challenge", [(False, 'Bearer realm="bb-worker"'),
                                                (True, 'Bearer realm="bb-worker", error="invalid_token"')])
def test_unauthorized_sends_the_bearer_challenge(invalid, challenge):
    error = errors.Unauthorized("a token is required", invalid=invalid)
    assert error.status == 401
    assert error.headers == [("WWW-Authenticate", challenge)]
    assert error.detail == "a token is required"


@pytest.mark.parametrize("allowed, allow", [(["POST"], "POST"), (["GET"], "GET, HEAD"),
                                            (["POST", "GET", "OPTIONS"], "GET, OPTIONS, POST, HEAD"),
                                            (["HEAD", "GET"], "GET, HEAD")])
def test_method_not_allowed_lists_the_methods_with_head_wherever_get(allowed, allow):
    error = errors.MethodNotAllowed("/api/prove", allowed)
    assert error.status == 405
    assert error.headers == [("Allow", allow)]
    assert error.detail == f"/api/prove accepts {allow}"


# ---------------------------------------------------------------- outcomes()

def test_outcomes_are_every_outcome_a_class_gives():
    assert errors.outcomes() == {"server_error", "bad_request", "upload_timeout", "too_large", "rejected",
                                 "client_gone", "unavailable", "not_ready", "busy", "crashed", "timeout",
                                 "crs_unavailable", "out_of_memory", "unverified"}
    assert errors.outcomes() == {cls.outcome for cls in CONTRACT} - {None}
    assert None not in errors.outcomes()
