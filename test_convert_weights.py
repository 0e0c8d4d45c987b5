"""Tests for convert_weights.py: the Hugging Face layout, bad input through the real command line, and
the resumable download against a local HTTP server that misbehaves on demand (conftest.py's Hub). The
Tortoise layout is tested against the original code in test_tortoise.py."""
import io
import json
import os
import random
import socket
import subprocess
import time

import pytest
import torch

import transformers
from transformers import ClvpFeatureExtractor

import clvp
import convert_weights
from conftest import maxdiff, original_speak_names, run_case, tiny_speak_file

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------
# The Hugging Face layout, and bad input
# ---------------------------------------------------------------------------------------------------


def run_convert(*args):
    """convert_weights.py's command line, run in this process (conftest.run_case)."""
    code, out, err, _, _ = run_case(HERE, "convert_weights.py", args)
    return subprocess.CompletedProcess(args, code, out, err)


def assert_clean_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_convert_writes_loadable_checkpoint_and_halves_in_fp16(tiny_hf_dir, tmp_path):
    full, half = tmp_path / "a.pt", tmp_path / "b.pt"
    assert run_convert("--hf", str(tiny_hf_dir), "-o", str(full)).returncode == 0
    assert run_convert("--hf", str(tiny_hf_dir), "-o", str(half), "--dtype", "float16").returncode == 0
    assert 0.4 < half.stat().st_size / full.stat().st_size < 0.6
    a, b = clvp.load_model(full, "cpu"), clvp.load_model(half, "cpu")
    assert b.decoder.head.weight.dtype == torch.float32
    assert maxdiff(a.decoder.head.weight, b.decoder.head.weight) < 1e-3


def test_convert_sharded_and_bin(tiny_pair, tmp_path):
    ref, model = tiny_pair
    for kwargs in (dict(max_shard_size="200KB"), dict(safe_serialization=False)):
        d = tmp_path / str(len(kwargs) + len(str(kwargs)))
        ref.save_pretrained(d, **kwargs)
        assert run_convert("--hf", str(d), "-o", str(d / "c.pt")).returncode == 0
        loaded = clvp.load_model(d / "c.pt", "cpu")
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_convert_bad_inputs(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    out = tmp_path / "out.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    assert_clean_error(run_convert("--hf", str(empty), "-o", str(out)), "no weights found")
    assert_clean_error(run_convert("--hf", str(tmp_path / "nope"), "-o", str(out)), "not a directory")

    state = load_file(tiny_hf_dir / "model.safetensors")
    for name, change in (("removed", lambda s: s.pop("speech_decoder_model.lm_head.bias")),
                         ("reshaped", lambda s: s.update({"logit_scale": torch.zeros(2)}))):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
        broken = dict(state)
        change(broken)
        save_file(broken, d / "model.safetensors")
        word = "lm_head.bias" if name == "removed" else "logit_scale"
        assert_clean_error(run_convert("--hf", str(d), "-o", str(out)), word)
    d = tmp_path / "truncated"
    d.mkdir()
    (d / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    (d / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes()[:5000])
    assert_clean_error(run_convert("--hf", str(d), "-o", str(out)), "model.safetensors")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".clvp-")]


def test_hf_tokenizer_files(tokenizer_json, tmp_path):
    """What transformers' ClvpTokenizer.save_pretrained writes for Tortoise's vocabulary reads back as the same
    tokenizer, encoding every test sentence alike."""
    from test_clvp import SENTENCES
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    source, saved = tmp_path / "source", tmp_path / "saved"
    source.mkdir()
    (source / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(model["merges"]) + "\n", encoding="utf-8")
    transformers.ClvpTokenizer(str(source / "vocab.json"), str(source / "merges.txt")).save_pretrained(saved)
    ours, loaded = clvp.Tokenizer.from_file(tokenizer_json), convert_weights.read_hf_tokenizer(saved)
    assert loaded.vocab == ours.vocab and loaded.merges == ours.merges
    assert [loaded.encode(t) for t in SENTENCES] == [ours.encode(t) for t in SENTENCES]
    (source / "merges.txt").write_text("#version: 0.2\nq z\n", encoding="utf-8")    # 'qz' is no token
    with pytest.raises(convert_weights.ConversionError, match="not a readable tokenizer"):
        convert_weights.read_hf_tokenizer(source)


def test_convert_carries_tokenizer_and_mel_norms(tiny_pair, tokenizer_json, tmp_path):
    ref, _ = tiny_pair
    ref.save_pretrained(tmp_path)
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vocab.json").write_text(json.dumps(model["vocab"]))
    (tmp_path / "src" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(model["merges"]) + "\n")
    transformers.ClvpTokenizer(str(tmp_path / "src" / "vocab.json"),
                               str(tmp_path / "src" / "merges.txt")).save_pretrained(tmp_path)
    norms = clvp.read_mel_norms(clvp.SHIPPED[1])
    ClvpFeatureExtractor(mel_norms=norms.tolist()).save_pretrained(tmp_path)
    assert convert_weights.main(["--hf", str(tmp_path), "-o", str(tmp_path / "c.pt")]) == 0
    loaded = clvp.load_model(tmp_path / "c.pt", "cpu")
    assert loaded.tokenizer.encode("Hello world") == [62, 84, 28, 2, 179, 79]
    assert maxdiff(loaded.mel_norms, norms) < 1e-6


# ---------------------------------------------------------------------------------------------------
# Fetching the official files, against a local HTTP server on 127.0.0.1 that misbehaves on demand
# ---------------------------------------------------------------------------------------------------


BIG = random.Random(0).randbytes(5 * 2**20 // 2)   # 2.5 MiB: several 1 MiB chunks
SMALL = b'{"model": {"type": "BPE"}}'


def torch_archive(n):
    """The bytes of a small torch file (a zip archive), as a .pth download must be."""
    buffer = io.BytesIO()
    torch.save({"x": torch.arange(n)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def hub(hub_server, no_hub_settings):
    hub_server.files.update({"big.bin": BIG, "tokenizer.json": SMALL, "autoregressive.pth": torch_archive(1000),
                             "clvp2.pth": torch_archive(3000), "mel_norms.pth": torch_archive(80)})
    return hub_server


@pytest.fixture
def no_hub_settings(monkeypatch):
    monkeypatch.delenv("CLVP_HUB_URL", raising=False)
    monkeypatch.delenv("CLVP_CACHE", raising=False)
    monkeypatch.setattr(convert_weights, "TIMEOUT", 5)


class Sleeps(list):
    """Stands in for time.sleep: records the delays, waits for none."""

    def __call__(self, seconds):
        self.append(seconds)


def fetch(hub, tmp_path, name="big.bin", **kw):
    kw.setdefault("sleep", Sleeps())
    dest = str(tmp_path / name)
    return convert_weights.download(f"{hub.url}/{name}", dest, progress=False, **kw), kw["sleep"]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_full_download(hub, tmp_path):
    path, sleeps = fetch(hub, tmp_path)
    assert read(path) == BIG
    assert hub.requests == [("big.bin", None)] and sleeps == []
    assert os.listdir(tmp_path) == ["big.bin"]


def test_dropped_connection_is_resumed_with_range(hub, tmp_path):
    hub.drop_once.add("big.bin")
    path, sleeps = fetch(hub, tmp_path)
    assert hub.requests == [("big.bin", None), ("big.bin", f"bytes={len(BIG) // 2}-")]
    assert hub.sent == len(BIG)   # nothing fetched twice
    assert read(path) == BIG and sleeps == [1]
    assert os.listdir(tmp_path) == ["big.bin"]


def test_range_survives_a_redirect(hub, tmp_path):
    hub.drop_once.add("big.bin")
    path = convert_weights.download(f"{hub.url}/r/big.bin", str(tmp_path / "big.bin"), progress=False, sleep=Sleeps())
    half = f"bytes={len(BIG) // 2}-"
    assert hub.requests == [("r/big.bin", None), ("big.bin", None), ("r/big.bin", half), ("big.bin", half)]
    assert read(path) == BIG


def test_existing_part_is_resumed(hub, tmp_path):
    (tmp_path / "big.bin.part").write_bytes(BIG[:123457])
    path, sleeps = fetch(hub, tmp_path)
    assert hub.requests == [("big.bin", "bytes=123457-")]
    assert hub.sent == len(BIG) - 123457
    assert read(path) == BIG and sleeps == []


def test_complete_part_answered_416_is_kept(hub, tmp_path):
    (tmp_path / "big.bin.part").write_bytes(BIG)
    path, _ = fetch(hub, tmp_path)
    assert hub.requests == [("big.bin", f"bytes={len(BIG)}-")] and hub.sent == 0
    assert read(path) == BIG


def test_part_longer_than_file_starts_over(hub, tmp_path):
    (tmp_path / "big.bin.part").write_bytes(BIG + b"junk")
    path, _ = fetch(hub, tmp_path)
    assert hub.requests == [("big.bin", f"bytes={len(BIG) + 4}-"), ("big.bin", None)]
    assert read(path) == BIG


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    hub.ignore_range = True
    (tmp_path / "big.bin.part").write_bytes(b"x" * 1000)   # appending to this would corrupt the file
    hub.drop_once.add("big.bin")
    path, sleeps = fetch(hub, tmp_path)
    assert [r for _, r in hub.requests] == ["bytes=1000-", f"bytes={len(BIG) // 2}-"]
    assert read(path) == BIG and sleeps == [1]


@pytest.mark.parametrize("code", [500, 503, 429])
def test_server_errors_and_rate_limits_are_retried(hub, tmp_path, code):
    hub.fail_once.add("big.bin")
    hub.fail_code = code
    path, sleeps = fetch(hub, tmp_path)
    assert len(hub.requests) == 2 and sleeps == [1]
    assert read(path) == BIG


def test_404_names_url_and_leaves_nothing(hub, tmp_path):
    with pytest.raises(convert_weights.DownloadError) as e:
        fetch(hub, tmp_path, name="missing.pth")
    assert f"{hub.url}/missing.pth" in str(e.value) and "404" in str(e.value)
    assert len(hub.requests) == 1   # not retried
    assert os.listdir(tmp_path) == []


def test_short_body_every_time_fails_after_retries(hub, tmp_path):
    hub.always_short.add("big.bin")
    with pytest.raises(convert_weights.DownloadError) as e:
        fetch(hub, tmp_path, retries=2)
    assert len(hub.requests) == 3 and e.value.args[0].count("\n") == 0
    assert "failed 3 times" in str(e.value) and f"of {len(BIG)} bytes" in str(e.value)
    assert not (tmp_path / "big.bin").exists()
    # What did arrive is kept for the next run: half, then half of the rest, ...
    assert read(tmp_path / "big.bin.part") == BIG[:len(BIG) - len(BIG) // 8]


def test_offline_is_one_clear_line_and_quick(no_hub_settings, tmp_path, monkeypatch):
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CLVP_HUB_URL", f"http://127.0.0.1:{port}")
    t = time.monotonic()
    with pytest.raises(convert_weights.DownloadError) as e:
        convert_weights.download_official(str(tmp_path / "w"), progress=False)
    assert time.monotonic() - t < 2
    assert str(e.value) == (f"cannot reach 127.0.0.1:{port}: Connection refused; "
                            "check your network connection or set CLVP_HUB_URL")
    sleeps = Sleeps()
    with pytest.raises(convert_weights.DownloadError):
        convert_weights.download(f"http://127.0.0.1:{port}/x", str(tmp_path / "x"), sleep=sleeps)
    assert sleeps == []   # refused is not retried
    assert os.listdir(tmp_path / "w") == []


def test_existing_dest_is_not_fetched_again(hub, tmp_path):
    (tmp_path / "big.bin").write_bytes(b"already here")
    path, _ = fetch(hub, tmp_path)
    assert hub.requests == [] and read(path) == b"already here"


def test_a_trickle_is_stopped_and_the_part_kept(hub, tmp_path, monkeypatch):
    """A server that sends under STALL's rate for its window (here 10 kB/s over 1 s; 1 KiB/s over 30 s in use)
    ends the download with one error naming the speed and how to resume; the .part stays and a later run
    resumes from it."""
    monkeypatch.setattr(convert_weights, "STALL", (1, 10_000))
    hub.trickle.add("big.bin")
    part = tmp_path / "big.bin.part"
    with pytest.raises(convert_weights.DownloadError, match=r"stalled at \d+ bytes/s over 1 s") as e:
        fetch(hub, tmp_path)
    assert f"kept in {part}: run the same command again to resume" in str(e.value)
    kept = part.stat().st_size
    assert 0 < kept < len(BIG) and len(hub.requests) == 1          # not retried: a retry would trickle too
    hub.trickle.discard("big.bin")
    path, _ = fetch(hub, tmp_path)
    assert read(path) == BIG and hub.requests[-1] == ("big.bin", f"bytes={kept}-")


def test_download_official(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("CLVP_HUB_URL", hub.url + "/")
    monkeypatch.setenv("CLVP_CACHE", str(tmp_path / "cache"))
    paths = convert_weights.download_official(progress=False)
    assert sorted(paths) == sorted(convert_weights.OFFICIAL_FILES)
    for name, path in paths.items():
        assert path == str(tmp_path / "cache" / name) and read(path) == hub.files[name]
    assert sorted(hub.requests) == sorted((name, None) for name in convert_weights.OFFICIAL_FILES)


def test_official_urls_and_cache_dir(no_hub_settings, monkeypatch):
    urls = convert_weights.official_urls()
    assert urls["clvp2.pth"] == "https://huggingface.co/jbetker/tortoise-tts-v2/resolve/main/.models/clvp2.pth"
    assert urls["autoregressive.pth"].endswith("tortoise-tts-v2/resolve/main/.models/autoregressive.pth")
    assert urls["mel_norms.pth"] == \
        "https://raw.githubusercontent.com/neonbjb/tortoise-tts/main/tortoise/data/mel_norms.pth"
    assert urls["tokenizer.json"].endswith("/tortoise-tts/main/tortoise/data/tokenizer.json")
    assert clvp.default_checkpoint() == os.path.join(os.path.expanduser("~"), ".cache", "clvp", "clvp.pt")
    monkeypatch.setenv("CLVP_HUB_URL", "http://mirror/x")
    assert set(convert_weights.official_urls().values()) == {f"http://mirror/x/{n}" for n in convert_weights.OFFICIAL_FILES}


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_tty(hub, tmp_path, monkeypatch, capsys):
    convert_weights.download(f"{hub.url}/big.bin", str(tmp_path / "big.bin"), progress=True)
    assert capsys.readouterr().err == ""   # captured stderr is not a TTY: nothing is printed
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    convert_weights.download(f"{hub.url}/big.bin", str(tmp_path / "again.bin"), progress=True)
    out = tty.getvalue()
    assert "\rbig.bin: 100% 2.5/2.5 MiB" in out and "MiB/s" in out and out.endswith("\n")
    tty2 = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty2)
    convert_weights.download(f"{hub.url}/tokenizer.json", str(tmp_path / "t.json"), progress=False)
    assert tty2.getvalue() == ""


def test_download_speak_fetches_and_converts_the_audio_files(hub, tmp_path, monkeypatch):
    """--download --speak: diffusion_decoder.pth (with a training-only tensor) and vocoder.pth (model_g, with
    weight norm) from the hub, converted into speak.pt beside clvp.pt, as speak.py then loads it."""
    import speak
    made = tmp_path / "made.pt"
    diffusion, vocoder = tiny_speak_file(made)
    blob = clvp.read_tensor_file(made, lambda blob: None)
    files = {"diffusion_decoder.pth": {**original_speak_names("diffusion", blob["diffusion"]), "mel_head.weight": torch.zeros(3)},
             "vocoder.pth": {"model_g": original_speak_names("vocoder", blob["vocoder"])}}
    for name, state in files.items():
        buffer = io.BytesIO()
        torch.save(state, buffer)
        hub.files[name] = buffer.getvalue()
    monkeypatch.setenv("CLVP_HUB_URL", hub.url)
    monkeypatch.setenv("CLVP_CACHE", str(tmp_path / "cache"))
    out = convert_weights.fetch_and_convert_audio(progress=False)
    assert out == str(tmp_path / "cache" / "speak.pt") == speak.default_speak_checkpoint()
    assert sorted(name for name, _ in hub.requests) == ["diffusion_decoder.pth", "vocoder.pth"]
    loaded, folded = speak.load_speak(out, "cpu", 64)
    for k, v in diffusion.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for k, v in vocoder.state_dict().items():
        assert (folded.state_dict()[k] - v).abs().max() <= 1e-6, k


def test_download_fast_fetches_and_converts_hifidecoder(hub, tmp_path, monkeypatch):
    """--download --fast: hifidecoder.pth (weight norm, a stray tensor) from the hub, folded into hifigan.pt beside
    clvp.pt, where speak.py --decoder hifigan looks; the URL is api_fast.py's repository unless CLVP_HUB_URL."""
    import speak
    torch.manual_seed(0)
    hifigan = speak.HifiGan(64, 32)
    state = {}
    for name, w in hifigan.state_dict().items():
        if name.endswith("weight") and not name.startswith("cond_layer"):
            state[name + "_v"], state[name + "_g"] = 2 * w, w.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
        else:
            state[name] = w
    buffer = io.BytesIO()
    torch.save({**state, "speaker_encoder.w": torch.zeros(2)}, buffer)
    hub.files["hifidecoder.pth"] = buffer.getvalue()
    assert convert_weights.official_urls(convert_weights.FAST_FILES) == {
        "hifidecoder.pth": "https://huggingface.co/Manmay/tortoise-tts/resolve/main/hifidecoder.pth"}
    monkeypatch.setenv("CLVP_HUB_URL", hub.url)
    monkeypatch.setenv("CLVP_CACHE", str(tmp_path / "cache"))
    out = convert_weights.fetch_and_convert_hifigan(progress=False)
    assert out == str(tmp_path / "cache" / "hifigan.pt") == speak.default_hifigan_checkpoint()
    assert [name for name, _ in hub.requests] == ["hifidecoder.pth"]
    loaded = speak.load_hifigan(out, "cpu", 64)
    for k, v in hifigan.state_dict().items():
        assert (loaded.state_dict()[k] - v).abs().max() <= 1e-6, k


def test_upgrade_rewrites_files_of_the_pickle_format_in_place(tmp_path, tiny_checkpoint):
    """clvp.pt and speak.pt as clvp wrote them before format version 2 (torch.save of a dict): clvp.py and
    speak.py refuse them in one line naming the command; the command rewrites them in place, same numbers."""
    import speak
    blob = clvp.read_tensor_file(tiny_checkpoint, lambda blob: None)
    torch.save({**blob, "version": 1, "extra": torch.zeros(1)}, tmp_path / "clvp.pt")
    tiny_speak_file(tmp_path / "new.pt")
    old_speak = {**clvp.read_tensor_file(tmp_path / "new.pt", lambda blob: None), "version": 1}
    old_speak.update({g: original_speak_names(g, old_speak[g]) for g in ("diffusion", "vocoder")})
    torch.save(old_speak, tmp_path / "speak.pt")
    for name, version, load in [("clvp.pt", 2, lambda p: clvp.load_model(p, "cpu")),
                                ("speak.pt", 3, lambda p: speak.load_speak(p, "cpu", 64))]:
        with pytest.raises(clvp.CheckpointError, match=f"rewrite it once with: python convert_weights.py --upgrade "
                                                       f".*{name}$"):
            load(tmp_path / name)
        code, out, err = run_case(tmp_path, "convert_weights.py", ["--upgrade", name])[:3]
        assert code == 0 and err == "" and f"rewrote {name} as format version {version}" in out, err
        load(tmp_path / name)
    new = clvp.read_tensor_file(tmp_path / "clvp.pt", lambda blob: None)
    assert set(new) == {"format", "version", "config", "weights", "tokenizer", "mel_norms"}
    assert new["config"] == blob["config"] and new["tokenizer"] == blob["tokenizer"]
    assert all(torch.equal(new["weights"][k], v) for k, v in blob["weights"].items())
    assert torch.equal(new["mel_norms"], blob["mel_norms"])
    assert clvp.read_tensor_file(tmp_path / "speak.pt", lambda blob: None)["version"] == 3
    for args, words in [(["--upgrade", "clvp.pt"], "not the zip archive torch.save writes"),
                        (["--upgrade", "clvp.pt", "-o", "x.pt"], "give it alone"),
                        (["--upgrade", "absent.pt"], "no such file")]:
        code, _, err = run_case(tmp_path, "convert_weights.py", args)[:3]
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    version_2 = {**old_speak, "version": 2}                # safetensors, with the original's nn.Sequential names
    clvp.write_tensor_file(tmp_path / "v2.pt", version_2)
    with pytest.raises(clvp.CheckpointError, match="version 2; this speak.py reads version 3"):
        speak.load_speak(tmp_path / "v2.pt", "cpu", 64)
    code, out, err = run_case(tmp_path, "convert_weights.py", ["--upgrade", "v2.pt"])[:3]
    assert code == 0 and err == "" and "rewrote v2.pt as format version 3" in out, err
    upgraded = clvp.read_tensor_file(tmp_path / "v2.pt", lambda blob: None)
    assert all(torch.equal(upgraded["diffusion"][k], v) for k, v in speak.load_speak(tmp_path / "speak.pt", "cpu", 64)[0]
               .state_dict().items())
    torch.save({"format": "clvp", "version": 2}, tmp_path / "odd.pt")
    code, _, err = run_case(tmp_path, "convert_weights.py", ["--upgrade", "odd.pt"])[:3]
    assert code == 2 and "not a clvp.pt or speak.pt of format version 1" in err, err
