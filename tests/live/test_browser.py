"""CORS in a real browser: headless Chromium (Debian's package, installed by `make test`)
loads tests/programs/prove.html from one local port; its script POSTs a witness with
fetch() to the live worker on another port, checks the proof with /api/verify and writes
the outcome into its title, which the test reads over the DevTools protocol."""
import fcntl
import functools
import http.server
import json
import os
import select
import shutil
import signal
import subprocess
import threading
import time

import pytest

from support import FIXTURES, ROOT, expected

# ---------------------------------------------------------------- headless Chromium over the DevTools pipe
# `--remote-debugging-pipe`: the browser reads JSON messages, each ended by a NUL byte, from its
# fd 3 and writes them to its fd 4, so no port, websocket library or browser download is needed.

BINARY = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--no-default-browser-check", "--remote-debugging-pipe"]


def _above(fd, low):
    """A close-on-exec copy of `fd` numbered >= low; `fd` is closed."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return copy


class BrowserError(Exception):
    """The browser exited, or did not answer a DevTools command in time."""


class Chromium:
    """One headless Chromium with a fresh profile in `user_data_dir`; a context manager."""

    def __init__(self, user_data_dir, timeout=30):
        assert os.access(BINARY, os.X_OK), f"Chromium not found at {BINARY}: `make setup` installs Debian's chromium"
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child's ends above fd 4, so that moving them onto 3 and 4 cannot clobber each other.
        to_browser_r, from_browser_w = (_above(fd, 10) for fd in (to_browser_r, from_browser_w))
        self._log = open(os.path.join(user_data_dir, "chromium.log"), "wb")

        def wire_pipes():  # in the child: the protocol's fds 3 (commands in) and 4 (replies out), inherited
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [BINARY, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            close_fds=False, preexec_fn=wire_pipes, start_new_session=True)  # pipes are O_CLOEXEC; 3, 4 are not
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0

    def send(self, method, params=None, session=None):
        """Run one DevTools command; returns its `result` dict. Raises BrowserError."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, deadline):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError(f"no answer from Chromium in {self.timeout} s")
            chunk = os.read(self._from_browser, 65536)
            if not chunk:
                raise BrowserError(f"Chromium exited ({self.proc.poll()}):\n{self.output()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url):
        """Open `url` in a new tab; returns the DevTools session id of the page."""
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        return self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session, expression):
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result["result"].get("value")

    def wait_for_title(self, session, prefixes, timeout):
        """Poll document.title until it starts with one of `prefixes`; returns it. Raises BrowserError."""
        deadline = time.monotonic() + timeout
        title = None
        while time.monotonic() < deadline:
            title = self.evaluate(session, "document.title")
            if title and title.startswith(tuple(prefixes)):
                return title
            time.sleep(0.1)
        raise BrowserError(f"page title still {title!r} after {timeout} s")

    def output(self):
        """What the browser printed (str)."""
        self._log.flush()
        with open(self._log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def close(self):
        """Close the browser (Browser.close, then SIGKILL of its process group after 10 s); always reaps."""
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers (zygote, renderers) share its session
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- the pages and the tests

PAGE_DIR = f"{ROOT}/tests/programs"
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
