"""Shared test fixtures: transformers' CLVP with random weights and its conversion (the parity reference);
the tortoise-tts 3.0.0 source package from PyPI (its texts, tokenizer.json, voice clips, mel_norms.pth and
the original code): $CLVP_TORTOISE_SRC, or downloaded once into ~/.cache/clvp-test; a local HTTP server
standing in for the hub."""
import http.server
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch

import clvp
import convert_weights

TORTOISE_VERSION = "3.0.0"


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Reference models (transformers) with random weights, converted once per session
# ---------------------------------------------------------------------------------------------------

TINY_HF = dict(
    text_config=dict(hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2,
                     num_attention_heads=2),
    speech_config=dict(vocab_size=8192, hidden_size=64, intermediate_size=128, projection_dim=64,
                       num_hidden_layers=2, num_attention_heads=2),
    decoder_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_mel_attn_blocks=2),
    projection_dim=64)
OFFICIAL_HF = dict(speech_config=dict(vocab_size=8192))   # the port's defaults are the official sizes


def make_reference(hf_kwargs, seed):
    """A transformers CLVP with every parameter randomized (zero-initialised ones included)."""
    from transformers import ClvpConfig, ClvpModelForConditionalGeneration
    torch.manual_seed(seed)
    ref = ClvpModelForConditionalGeneration(ClvpConfig(**hf_kwargs)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # A random decoder may emit the start token, which the speech encoder cannot embed; forbid it.
        ref.speech_decoder_model.lm_head.bias[8192] = -1e4
    return ref


def converted(ref, directory):
    ref.save_pretrained(directory)
    out = os.path.join(directory, "clvp.pt")
    assert convert_weights.main(["--hf", str(directory), "-o", out]) == 0
    return clvp.load_model(out, "cpu")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    ref = make_reference(TINY_HF, seed=0)
    return ref, converted(ref, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def official_pair(tmp_path_factory):
    ref = make_reference(OFFICIAL_HF, seed=1)
    return ref, converted(ref, tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_pair):
    ref, _ = tiny_pair
    d = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random model saved as a real checkpoint, with the official tokenizer and mel norms."""
    torch.manual_seed(11)
    config = clvp.tiny_config()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    clvp.save_checkpoint(path, config, clvp.CLVP(config).state_dict(),
                         clvp.Tokenizer.from_file(os.path.join(clvp.DATA, "tokenizer.json")),
                         torch.load(os.path.join(clvp.DATA, "mel_norms.pth"), weights_only=True))
    return str(path)


# ---------------------------------------------------------------------------------------------------
# The original Tortoise source package
# ---------------------------------------------------------------------------------------------------


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


@pytest.fixture(scope="session")
def tokenizer_json(tortoise_src):
    return tortoise_src / "tortoise" / "data" / "tokenizer.json"


# ---------------------------------------------------------------------------------------------------
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


def tiny_speak_file(path, edit=lambda blob: None):
    """A tiny random speak.pt in the converted layout, the vocoder with weight norm (g = |v| rows)."""
    import speak
    diffusion, vocoder = speak.random_speak(speak.DiffusionConfig(64, 2, 2, 64), "cpu")
    voc = {}
    for k, v in vocoder.state_dict().items():
        if k.endswith(".weight") and v.dim() == 3:
            voc[k + "_v"], voc[k + "_g"] = v, v.flatten(1).norm(dim=1).view(-1, 1, 1)
        else:
            voc[k] = v
    blob = {"format": "speak", "version": 1, "diffusion": diffusion.state_dict(), "vocoder": voc}
    edit(blob)
    torch.save(blob, path)
    return diffusion, vocoder
