"""Bearer-token authentication (RFC 6750) for the proving endpoints.

Tokens come from API_TOKENS (fixed at start) and API_TOKENS_FILE (one token per
line, blank lines and `#` comments ignored), which is re-read whenever it changes,
so tokens rotate without a restart. Tokens are compared in constant time (as
SHA-256 digests, so not even their length leaks) and never logged.
"""
import hashlib
import hmac
import logging
import os

log = logging.getLogger("bb_worker")


def _digest(token):
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_tokens(text):
    """The tokens (list of str) in API_TOKENS_FILE's text: one per line (commas also separate), `#` lines skipped."""
    tokens = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        tokens += [t.strip() for t in line.split(",") if t.strip()]
    return tokens


class TokenAuth:
    """Which bearer tokens are accepted: `tokens` (iterable of str) plus those in the file at `path`.

    Enabled when either is given (settings.py refuses to start with a file that holds
    no token). The file is re-read when its (inode, size, mtime) changes; if it cannot
    be read or holds no token, the last tokens read from it stay in force (logged).
    """

    def __init__(self, tokens=(), path=None):
        self.path = path
        self.enabled = bool(path) or bool(list(tokens))
        self._fixed = [_digest(t) for t in tokens]
        self._from_file = []
        self._stamp = None

    def _file_digests(self):
        if not self.path:
            return []
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                    tokens = parse_tokens(f.read())
                self._stamp = stamp
                if tokens:
                    self._from_file = [_digest(t) for t in tokens]
                    log.info("API_TOKENS_FILE: %d tokens loaded", len(self._from_file))
                else:  # half-written, or emptied by mistake: refusing every client would be an outage
                    log.error("API_TOKENS_FILE %s holds no token: keeping the %d tokens read before",
                              self.path, len(self._from_file))
        except OSError as exc:
            if self._stamp != "error":
                log.error("API_TOKENS_FILE %s cannot be read (%s): keeping the %d tokens read before",
                          self.path, exc.strerror, len(self._from_file))
            self._stamp = "error"
        return self._from_file

    def allows(self, authorization):
        """True when the Authorization header value (str or None) carries an accepted bearer token.

        Always True when authentication is not enabled. Every accepted token is
        compared, whichever matches, so the time taken says nothing about which.
        """
        if not self.enabled:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = _digest(token)
        match = False
        for known in self._fixed + self._file_digests():
            match |= hmac.compare_digest(candidate, known)
        return match
