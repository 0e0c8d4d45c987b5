"""Shared test fixtures. A local HTTP server standing in for the hub; the tortoise-tts 3.0.0 source package from PyPI (its texts, tokenizer.json, voice
clips, mel_norms.pth and the original code): $CLVP_TORTOISE_SRC, or downloaded once into ~/.cache/clvp-test."""
import http.server
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

TORTOISE_VERSION = "3.0.0"


@pytest.fixture(scope="session")
def tortoise_src() -> Path:
    """Directory of the unpacked tortoise-tts 3.0.0 sdist.

    $CLVP_TORTOISE_SRC if set; otherwise `pip download` it once into ~/.cache/clvp-test."""
    env = os.environ.get("CLVP_TORTOISE_SRC")
    if env:
        root = Path(env)
        if not (root / "tortoise" / "data" / "mel_norms.pth").is_file():
            pytest.fail(f"CLVP_TORTOISE_SRC={env} does not look like the unpacked tortoise-tts sdist")
        return root
    cache = Path.home() / ".cache" / "clvp-test"
    root = cache / f"tortoise-tts-{TORTOISE_VERSION}"
    if not (root / "tortoise" / "data" / "mel_norms.pth").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        sdist = cache / f"tortoise-tts-{TORTOISE_VERSION}.tar.gz"
        if not sdist.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"tortoise-tts=={TORTOISE_VERSION}", "-d", str(cache)], check=True)
        with tarfile.open(sdist) as tar:
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(cache, **kw)
    return root


# A stand-in for the hub on 127.0.0.1: serves named files with HTTP Range, and misbehaves on demand.
class Hub(http.server.ThreadingHTTPServer):
    """Serves `files` with Range support. The sets name files to misbehave on (see Handler)."""

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files, self.requests, self.sent = dict(files), [], 0
        self.drop_once, self.always_short, self.fail_once, self.ignore_range = set(), set(), set(), False
        self.fail_code = 500

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        s, name, rng = self.server, self.path.lstrip("/"), self.headers.get("Range")
        s.requests.append((name, rng))
        if name.startswith("r/"):   # as Hugging Face does: resolve/... redirects to a CDN
            self.send_response(302)
            self.send_header("Location", "/" + name[2:])
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if name not in s.files:
            return self.send_error(404)
        if name in s.fail_once:
            s.fail_once.discard(name)
            return self.send_error(s.fail_code)
        data, start = s.files[name], 0
        if rng and not s.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in s.drop_once or name in s.always_short:
            # Headers promise the whole body; half of it is written, then the socket closes.
            s.drop_once.discard(name)
            body = body[:len(body) // 2]
            self.close_connection = True
        s.sent += len(body)   # counted first: the client may finish before write() returns
        self.wfile.write(body)


@pytest.fixture
def hub_server():
    s = Hub({})
    thread = threading.Thread(target=s.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()
    thread.join(5)
