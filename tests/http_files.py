"""A small HTTP file server on 127.0.0.1 for the download tests: Range requests, redirects, 404s,
and connections cut after a given byte. Nothing here reaches past this machine."""

import contextlib
import http.server
import re
import socket
import threading


class FileServer:
    """Files served by path; every request is recorded as ``(path, Range header or None)``."""

    def __init__(self):
        self.files = {}  # path -> bytes
        self.cuts = {}  # path -> [bytes sent before the connection is cut, how many more responses to cut]
        self.redirects = {}  # path -> path
        self.no_range = set()  # paths served whole (200) whatever the Range header says
        self.requests = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, path, data, *, cut_after=None, cuts=1, ranges=True):
        """Serve ``data`` at ``path``; the first ``cuts`` responses are cut after ``cut_after`` bytes
        of their body; ``ranges=False``: Range requests are answered with the whole file."""
        self.files[path] = bytes(data)
        if cut_after is not None:
            self.cuts[path] = [cut_after, cuts]
        if not ranges:
            self.no_range.add(path)
        return self.url(path)

    def redirect(self, path, to):
        self.redirects[path] = to
        return self.url(path)

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def ranges_asked(self, path):
        return [r for p, r in self.requests if p == path]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _handler(files: FileServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            files.requests.append((self.path, self.headers.get("Range")))
            if self.path in files.redirects:
                self.send_response(302)
                self.send_header("Location", files.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path not in files.files:
                self.send_error(404, "Not Found")
                return
            data = files.files[self.path]
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            start = int(match.group(1)) if match and self.path not in files.no_range else 0
            if start >= len(data) > 0:
                self.send_error(416, "Requested Range Not Satisfiable")
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            end = len(data)
            cut = files.cuts.get(self.path)
            if cut and cut[1] > 0 and start + cut[0] < end:
                cut[1] -= 1
                end = start + cut[0]
            self.wfile.write(data[start:end])
            if end < len(data):
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


def closed_port_url(path="/file"):
    """A URL on 127.0.0.1 where nothing listens: the connection is refused (as offline)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
