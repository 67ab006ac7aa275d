"""A small HTTP file server on 127.0.0.1 for the download tests: Range requests, redirects, 404s,
connections cut after a given byte, and a hostile server's ways: lying or malformed size headers,
no Content-Length, a body longer than the file, trickling, stalling. Nothing here reaches past
this machine."""

import contextlib
import http.server
import re
import socket
import threading
import time

_SAME = object()  # a header left as the file gives it


class FileServer:
    """Files served by path; every request is recorded as ``(path, Range header or None)``."""

    def __init__(self):
        self.files = {}  # path -> bytes
        self.cuts = {}  # path -> [bytes sent before the connection is cut, how many more responses to cut]
        self.redirects = {}  # path -> path
        self.no_range = set()  # paths served whole (200) whatever the Range header says
        self.lies = {}  # path -> {"length": Content-Length sent (None: none), "content_range": ...}
        self.stalls = {}  # path -> [bytes sent before the response stalls, how many more responses to stall]
        self.trickles = {}  # path -> (bytes per piece, seconds between pieces)
        self.stopping = threading.Event()  # set on exit: stalled and trickling responses end
        self.requests = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, path, data, *, cut_after=None, cuts=1, ranges=True, length=_SAME, content_range=_SAME,
            stall_after=None, stalls=1, trickle=None):
        """Serve ``data`` at ``path``; the first ``cuts`` responses are cut after ``cut_after`` bytes
        of their body; ``ranges=False``: Range requests are answered with the whole file.
        A hostile server: ``length`` is the Content-Length header sent (``None``: none, the body
        ends when the connection closes), ``content_range`` that of a 206 answer; the first
        ``stalls`` responses send ``stall_after`` bytes and then nothing, the connection open;
        ``trickle=(n, seconds)`` sends ``n`` bytes every ``seconds``."""
        self.files[path] = bytes(data)
        if cut_after is not None:
            self.cuts[path] = [cut_after, cuts]
        if not ranges:
            self.no_range.add(path)
        self.lies[path] = {k: v for k, v in (("length", length), ("content_range", content_range)) if v is not _SAME}
        if stall_after is not None:
            self.stalls[path] = [stall_after, stalls]
        if trickle is not None:
            self.trickles[path] = trickle
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
        self.stopping.set()
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
            lies = files.lies.get(self.path, {})
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", lies.get("content_range",
                                                           f"bytes {start}-{len(data) - 1}/{len(data)}"))
            length = lies.get("length", str(len(data) - start))
            if length is not None:
                self.send_header("Content-Length", length)
            else:
                self.close_connection = True
            self.end_headers()
            end = len(data)
            cut = files.cuts.get(self.path)
            if cut and cut[1] > 0 and start + cut[0] < end:
                cut[1] -= 1
                end = start + cut[0]
            stall = files.stalls.get(self.path)
            if stall and stall[1] > 0:
                stall[1] -= 1
                self.wfile.write(data[start:start + stall[0]])
                self.wfile.flush()
                files.stopping.wait(10)  # the connection stays open, silent
                return
            try:
                self._send(data[start:end], files.trickles.get(self.path))
            except OSError:  # the client gave up
                return
            if end < len(data) or length is None:
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def _send(self, body, trickle):
            if trickle is None:
                self.wfile.write(body)
                return
            piece, pause = trickle
            for k in range(0, len(body), piece):
                if files.stopping.is_set():
                    return
                self.wfile.write(body[k:k + piece])
                self.wfile.flush()
                time.sleep(pause)

    return Handler


def closed_port_url(path="/file"):
    """A URL on 127.0.0.1 where nothing listens: the connection is refused (as offline)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
