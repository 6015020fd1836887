"""Cross-origin resource sharing (the Fetch standard's CORS protocol) for browser clients.

CORS_ALLOW_ORIGINS (settings.parse_origins) is `*` or a set of origins. Preflight
requests (OPTIONS with Origin and Access-Control-Request-Method) are answered 204
with the methods of that path and the request headers a client may send; actual
replies carry the origin and expose the headers a client reads.
"""
ALLOW_HEADERS = ("Content-Type", "Authorization", "Accept", "If-None-Match", "X-Public-Inputs",
                 "X-Request-Id", "traceparent")
EXPOSE_HEADERS = ("X-Public-Inputs", "X-Request-Id", "Retry-After", "ETag", "WWW-Authenticate")
MAX_AGE_SECONDS = 86400  # browsers cap it lower (Chromium: 2 h)


class CorsPolicy:
    """The CORS headers for `origins` ("*" or a set of origins; None turns CORS off)."""

    def __init__(self, origins):
        self.origins = origins

    @property
    def enabled(self):
        return bool(self.origins)

    def _allow_origin(self, origin):
        """The Access-Control-Allow-Origin headers for a request from `origin` (str or None)."""
        if not self.origins or not origin:
            return []
        if self.origins == "*":
            return [("Access-Control-Allow-Origin", "*")]
        if origin.lower() in self.origins:
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return [("Vary", "Origin")]

    def is_preflight(self, method, environ):
        """True for a CORS preflight this policy answers (OPTIONS with Origin and a requested method)."""
        return (self.enabled and method == "OPTIONS" and bool(environ.get("HTTP_ORIGIN"))
                and bool(environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD")))

    def preflight(self, environ, allowed_methods):
        """Headers of the 204 answering a preflight for a path that allows `allowed_methods`.

        Without Access-Control-Allow-Origin (an origin not listed, a method the path
        does not allow) the browser refuses the actual request.
        """
        headers = self._allow_origin(environ.get("HTTP_ORIGIN"))
        wanted = environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD", "")
        if not any(name == "Access-Control-Allow-Origin" for name, _ in headers) or wanted not in allowed_methods:
            return [h for h in headers if h[0] == "Vary"]
        return headers + [("Access-Control-Allow-Methods", ", ".join(sorted(allowed_methods))),
                          ("Access-Control-Allow-Headers", ", ".join(ALLOW_HEADERS)),
                          ("Access-Control-Max-Age", str(MAX_AGE_SECONDS))]

    def reply_headers(self, environ):
        """Headers added to an actual (non-preflight) reply."""
        headers = self._allow_origin(environ.get("HTTP_ORIGIN"))
        if any(name == "Access-Control-Allow-Origin" for name, _ in headers):
            headers.append(("Access-Control-Expose-Headers", ", ".join(EXPOSE_HEADERS)))
        return headers
