"""Shared test fixtures: transformers' CLVP with random weights and its conversion (the parity reference);
the tortoise-tts 3.0.0 source package from PyPI (its texts, tokenizer.json, voice clips, mel_norms.pth and
the original code): $CLVP_TORTOISE_SRC, or downloaded once into ~/.cache/clvp-test; a local HTTP server
standing in for the hub.

The two tiers. `python -m pytest -q` runs the default tier: the tiny-size parity, the front ends, the units and
the hostile cases, in minutes. Tests marked `full` (official-size models, the original Tortoise code in its own
venv, the seeded training run, the longest chains) run only with `--full`; CI runs both tiers, and there a
skipped test fails the run."""
import contextlib
import fcntl
import functools
import http.server
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import bench
import clvp
import convert_weights
import speak
import train

HERE = os.path.dirname(os.path.abspath(__file__))

TORTOISE_VERSION = "3.0.0"


# ---------------------------------------------------------------------------------------------------
# The two tiers
# ---------------------------------------------------------------------------------------------------

FULL = pytest.mark.full        # official-size models, the original code, the long runs: only with --full


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the full tier: official-size parity against transformers and the original "
                          "Tortoise code, the seeded training run and the longest command-line chains")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: the full tier (official size, the original code, long runs); "
                                       "runs with --full")
    config.left_out = 0


@pytest.hookimpl(tryfirst=True)          # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Without --full, the full tier is deselected. With it, the full tests share one xdist worker (group
    "full"), which builds each official-size fixture and the oracle's venv once, unless a test names a group
    of its own (bench.py --speak, about as long as all the rest on a CPU without AVX-512 BF16)."""
    full = [item for item in items if item.get_closest_marker("full")]
    if config.getoption("--full"):
        for item in full:
            if not item.get_closest_marker("xdist_group"):
                item.add_marker(pytest.mark.xdist_group("full"))
    elif full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]
        config.left_out = len(full)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """-n auto (pytest.ini): a worker per core, at most 4 (each holds its own torch and tiny models)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


# An xdist worker shares the cores with the others: torch in each uses its share of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist: the workers collect, so the count of what was left out comes back from them."""
    node.config.left_out = max(node.config.left_out, node.workeroutput.get("left_out", 0))


def pytest_terminal_summary(terminalreporter, config):
    if config.left_out:
        terminalreporter.write_line(
            f"default tier: {config.left_out} tests of the full tier left out (official-size parity, the original "
            "Tortoise code, training, the long chains); run everything with: python -m pytest -q --full")


def pytest_sessionfinish(session, exitstatus):
    """In CI every test runs: a skip there is a failure."""
    if hasattr(session.config, "workeroutput"):                 # an xdist worker
        session.config.workeroutput["left_out"] = session.config.left_out
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.ensure_newline()
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; every test must run in CI", red=True)
        session.exitstatus = 1


# ---------------------------------------------------------------------------------------------------
# Running a command the way a user would: a child process, or the same run in this process
# ---------------------------------------------------------------------------------------------------

def run_bounded(argv, cwd, env=None, preexec_fn=None, seconds=60):
    """Run argv -> (exit code, stdout, stderr, seconds, peak RSS in MiB); killed after `seconds`. The peak is
    the child's own VmHWM, polled while it runs (wait4's ru_maxrss starts from the forking parent's)."""
    start, peak = time.monotonic(), 0
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
    streams = {}
    readers = [threading.Thread(target=lambda name, s: streams.update({name: s.read().decode(errors="replace")}),
                                args=(name, s)) for name, s in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
        except (OSError, ValueError):                        # between exit and reaping
            pass
        if time.monotonic() - start > seconds:
            p.kill()
        time.sleep(0.02)
    for r in readers:
        r.join()
    return p.returncode, streams["out"], streams["err"], time.monotonic() - start, peak / 1024


# The same run without a new interpreter (6-9 s each, most of it importing torch): the script's main(argv) in
# this process, in `cwd`, with fd 0 on /dev/null and fds 1 and 2 in files, so that what a C library writes to
# them is seen as a child's would be. A real process is kept for what only a process shows: a preexec_fn (file
# size limits), the locale and the terminal's encoding, FIFOs (a bug that opens one would block this process),
# a copy of the project, signals.
MAINS = {"clvp.py": clvp, "speak.py": speak, "convert_weights.py": convert_weights, "bench.py": bench,
         "train.py": train}


class TimedOut(BaseException):
    """Raised by SIGALRM when the time is up; not an Exception, so run_command cannot make it exit code 1."""


def memory_status():
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}


@functools.cache
def interpreter_mib():
    """The peak RSS of a fresh interpreter that has imported the project, in MiB: what every child starts at."""
    code = ("import clvp, speak, convert_weights, bench, train\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    return int(subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout) / 1024


def run_in_process(script, args, cwd, env, base_mib, seconds):
    """run_bounded's tuple for `script args`, run here. Its peak is base_mib (a fresh interpreter's) plus this
    process's peak RSS above what it held before the run (VmHWM reset through /proc/self/clear_refs)."""
    saved_fds, saved_streams = [os.dup(fd) for fd in (0, 1, 2)], (sys.stdin, sys.stdout, sys.stderr)
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimedOut(f"over {seconds} s")))
    with open(os.devnull, "rb") as null, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, target in ((0, null), (1, out), (2, err)):
                os.dup2(target.fileno(), fd)
            sys.stdin, sys.stdout, sys.stderr = (open(fd, mode, buffering=1, encoding="utf-8", closefd=False)
                                                 for fd, mode in ((0, "r"), (1, "w"), (2, "w")))
            os.environ.update(env or {})
            os.chdir(cwd)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                    # VmHWM := VmRSS
            before, start = memory_status()["VmRSS"], time.monotonic()
            signal.alarm(seconds)
            try:
                code = MAINS[script].main([str(a) for a in args])
            except SystemExit as e:                             # --help, --version
                code = e.code
            finally:
                signal.alarm(0)
            took, peak = time.monotonic() - start, memory_status()["VmHWM"] - before
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdin, sys.stdout, sys.stderr = saved_streams
            for fd, copy in zip((0, 1, 2), saved_fds):
                os.dup2(copy, fd)
                os.close(copy)
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            signal.signal(signal.SIGALRM, previous)
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace"), took, \
            base_mib + peak / 1024


def run_case(work, script, args, env=None, preexec_fn=None, process=False, seconds=60):
    """run_bounded's tuple for `script args` in `work`: in this process where nothing needs a real one (MAINS)."""
    if process or preexec_fn or script not in MAINS or any(not k.startswith("CLVP_") for k in env or {}):
        script = script if os.path.isabs(script) else os.path.join(HERE, script)
        return run_bounded([sys.executable, script, *map(str, args)], work, env, preexec_fn, seconds)
    return run_in_process(script, args, work, env, interpreter_mib(), seconds)


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
    clvp.save_checkpoint(path, config, clvp.DecoderAndCLVP(config).state_dict(),
                         clvp.Tokenizer.from_file(os.path.join(clvp.DATA, "tokenizer.json")),
                         clvp.read_mel_norms(clvp.SHIPPED[1]))
    return str(path)


# ---------------------------------------------------------------------------------------------------
# The original Tortoise source package
# ---------------------------------------------------------------------------------------------------


CACHE = Path.home() / ".cache" / "clvp-test"


@contextlib.contextmanager
def cache_lock(name):
    """While held, this process alone makes or reads NAME in the test cache (xdist workers and concurrent runs
    wait for each other)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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
    root = CACHE / f"tortoise-tts-{TORTOISE_VERSION}"
    with cache_lock("tortoise-src"):
        if not (root / "tortoise" / "data" / "mel_norms.pth").is_file():
            sdist = CACHE / f"tortoise-tts-{TORTOISE_VERSION}.tar.gz"
            if not sdist.is_file():
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                f"tortoise-tts=={TORTOISE_VERSION}", "-d", str(CACHE)], check=True)
            with tarfile.open(sdist) as tar:
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(CACHE, **kw)
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
        self.trickle = set()             # sent at about 1 KiB/s
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
        try:
            if name in s.trickle:
                for i in range(0, len(body), 64):
                    self.wfile.write(body[i:i + 64])
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):            # the client gave up
            self.close_connection = True


@pytest.fixture
def hub_server():
    s = Hub({})
    thread = threading.Thread(target=s.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()
    thread.join(5)


# speak.py's names -> the original's, as Tortoise's diffusion_decoder.pth and vocoder.pth hold them: the fixtures
# that stand in for those files use them (convert_weights.SPEAK_RENAMES goes the other way; test_tortoise.py
# checks that direction against the original's own modules).
ORIGINAL_SPEAK_NAMES = {
    "diffusion": [(r"\.in_norm\.", ".in_layers.0."), (r"\.in_conv\.", ".in_layers.2."), (r"\.emb\.", ".emb_layers.1."),
                  (r"\.out_norm\.", ".out_layers.0."), (r"\.out_conv\.", ".out_layers.3."),
                  (r"^voice_conv1\.", "contextual_embedder.0."), (r"^voice_conv2\.", "contextual_embedder.1."),
                  (r"^voice_attention\.(\d)\.", lambda m: f"contextual_embedder.{int(m[1]) + 2}."),
                  (r"^latent_conv\.", "latent_conditioner.0."),
                  (r"^latent_attention\.(\d)\.", lambda m: f"latent_conditioner.{int(m[1]) + 1}."),
                  (r"^time_fc1\.", "time_embed.0."), (r"^time_fc2\.", "time_embed.2."),
                  (r"^out_norm\.", "out.0."), (r"^out_conv\.", "out.2.")],
    "vocoder": [(r"\.input_conv\.", ".input_conv.0."), (r"\.residual_convs\.(\d)\.1\.", r".residual_convs.\1.3."),
                (r"\.residual_convs\.(\d)\.0\.", r".residual_convs.\1.1."), (r"\.convt_pre\.", ".convt_pre.1."),
                (r"\.conv_blocks\.(\d)\.", r".conv_blocks.\1.1."), (r"^conv_post\.", "conv_post.1.")],
}


def original_speak_names(group, state):
    import convert_weights
    return convert_weights.speak_names(group, state, ORIGINAL_SPEAK_NAMES)


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
    blob = {"format": "speak", "version": speak.SPEAK_VERSION, "diffusion": diffusion.state_dict(), "vocoder": voc}
    edit(blob)
    clvp.write_tensor_file(path, blob)
    return diffusion, vocoder
