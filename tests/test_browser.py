"""CORS in a real browser: headless Chromium (Debian's package, installed by `make test`)
loads tests/browser/prove.html from one local port; its script POSTs a witness with
fetch() to the live worker on another port, checks the proof with /api/verify and writes
the outcome into its title, which the test reads over the DevTools protocol."""
import functools
import http.server
import json
import shutil
import threading

import pytest

from chromium import Chromium
from conftest import FIXTURES, expected
from support import ROOT

PAGE_DIR = f"{ROOT}/tests/browser"
TOKEN = "browser-token-5e1"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def page_origin(tmp_path):
    """http://127.0.0.1:<port> serving prove.html and the witness valid_1.gz (another origin than the worker's)."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(f"{PAGE_DIR}/prove.html", site / "prove.html")
    shutil.copy(f"{FIXTURES}/valid_1.gz", site / "valid_1.gz")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def run_page(tmp_path, page_origin, worker_port, token=""):
    """The title prove.html ends with: "done:<JSON>" or "error:<reason>"."""
    profile = tmp_path / "profile"
    profile.mkdir()
    with Chromium(str(profile)) as browser:
        tab = browser.open(f"{page_origin}/prove.html?worker=http://127.0.0.1:{worker_port}&token={token}")
        return browser.wait_for_title(tab, ("done:", "error:"), timeout=120)


def test_browser_gets_a_proof_across_origins_with_cors(start_server, tmp_path, page_origin):
    srv = start_server(CORS_ALLOW_ORIGINS=page_origin, API_TOKENS=TOKEN)
    title = run_page(tmp_path, page_origin, srv.port, TOKEN)
    assert title.startswith("done:"), title
    outcome = json.loads(title[len("done:"):])
    assert outcome["proofBytes"] == 14656  # bb 5.0.0's UltraHonk proof: 458 field elements
    assert outcome["publicInputs"] == expected()["valid_1.gz"]["public_inputs"]
    assert outcome["valid"] is True  # the worker's /api/verify, called from the page
    assert outcome["requestId"], "X-Request-Id must be exposed to scripts"
    log = srv.output()
    assert "OPTIONS /api/prove 204" in log and "POST /api/prove 200" in log and "POST /api/verify 200" in log


def test_browser_blocks_the_proof_without_cors(start_server, tmp_path, page_origin):
    srv = start_server()
    title = run_page(tmp_path, page_origin, srv.port)
    assert title.startswith("error:TypeError"), title  # fetch() rejects: the browser refused the reply
    log = srv.output()
    assert "OPTIONS /api/prove 405" in log and "POST /api/prove" not in log  # stopped at the preflight


def test_browser_blocks_origins_not_listed(start_server, tmp_path, page_origin):
    srv = start_server(CORS_ALLOW_ORIGINS="https://someone-else.example")
    title = run_page(tmp_path, page_origin, srv.port)
    assert title.startswith("error:TypeError"), title
    assert "POST /api/prove" not in srv.output()
