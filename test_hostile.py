"""Hostile input at every boundary: the command lines of clvp.py, convert_weights.py and bench.py, converted
checkpoints, the download, and the library API.

Every command-line case runs the real program (its main(argv) in this process, or a child process where only
a process shows the behaviour: conftest.run_case) in a directory of its own and asserts what the project
promises for bad input: exit code 2, exactly one line on stderr, no traceback, no file created and every
input file byte-identical afterwards, and an end within a time and a memory bound. The API cases assert a
ValueError that names the argument. A few valid runs at the end show that the checks refuse nothing that
works.
"""
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
import types

import numpy as np
import pytest
import soundfile
import torch

import clvp
import speak
import convert_weights
from conftest import MAINS, TimedOut, interpreter_mib, run_bounded, run_case, tiny_speak_file

HERE = os.path.dirname(os.path.abspath(__file__))
SECONDS, MIB = 60, 1024          # every bad input is refused within these (a normal tiny run: ~3 s, ~330 MiB)
CLIPS = 6                        # seconds of audio clvp.py uses


# ---------------------------------------------------------------------------------------------------
# Running a command the way a user would, and checking that nothing changed
# ---------------------------------------------------------------------------------------------------

def snapshot(root):
    """{path: what it is}: a regular file by its bytes' hash, anything else by its kind; FIFOs are never
    opened (that would block)."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    seen[path] = hashlib.sha256(f.read()).hexdigest()
            else:
                seen[path] = stat.S_IFMT(mode)
    return seen


def test_the_in_process_runner_sees_what_a_child_would(tmp_path, monkeypatch):
    """A case run in this process must show what a child shows: its exit code, what C code writes to fds 1 and 2
    (here os.write) in order with Python's prints, files made in its folder, its environment, its memory above
    a fresh interpreter's, and an end after SECONDS; and this process must be as it was afterwards."""
    def main(argv):
        os.write(2, b"written by C\n")
        print("printed", argv, file=sys.stderr)
        print(os.environ["CLVP_X"])
        with open("made", "w") as f:
            f.write("x")
        big = bytearray(b"\1") * (300 * 2**20)
        return 3 + 0 * len(big)
    monkeypatch.setitem(MAINS, "fake.py", types.SimpleNamespace(main=main))
    cwd = os.getcwd()
    code, out, err, seconds, mib = run_case(tmp_path, "fake.py", ["a"], {"CLVP_X": "y"})
    assert code == 3 and out == "y\n" and err.splitlines() == ["written by C", "printed ['a']"]
    assert (tmp_path / "made").read_text() == "x" and os.getcwd() == cwd and "CLVP_X" not in os.environ
    assert mib > interpreter_mib() + 290 and seconds < SECONDS
    monkeypatch.setitem(MAINS, "hang.py", types.SimpleNamespace(main=lambda argv: time.sleep(30)))
    with pytest.raises(TimedOut):
        run_case(tmp_path, "hang.py", [], seconds=1)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and os.getcwd() == cwd


def refused(work, *args, words=(), script="clvp.py", env=None, preexec_fn=None, also=(), process=False):
    """Run `script args` in `work` and assert the promise for bad input; `also`: inputs outside `work`."""
    before = {**snapshot(work), **{p: snapshot(p) if os.path.isdir(p) else open(p, "rb").read() for p in also}}
    code, out, err, seconds, mib = run_case(work, script, args, env, preexec_fn, process, SECONDS)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    for w in words:
        assert w in lines[0], lines[0]
    after = {**snapshot(work), **{p: snapshot(p) if os.path.isdir(p) else open(p, "rb").read() for p in also}}
    assert after == before, "files changed"
    assert seconds < SECONDS and mib < MIB, (seconds, mib)
    return lines[0]


@pytest.fixture
def work(tmp_path, tiny_checkpoint):
    """A user's folder: a voice clip, a converted tiny checkpoint and a text file."""
    shutil.copy(os.path.join(HERE, "examples", "voice.wav"), tmp_path / "voice.wav")
    shutil.copy(tiny_checkpoint, tmp_path / "tiny.pt")
    (tmp_path / "lines.txt").write_text("The first line.\nThe second line.\n")
    return tmp_path


def rank(*extra):
    """A small ranking run on the tiny checkpoint, with `extra` arguments."""
    return ["--text", "Hi there.", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--candidates", 2,
            "--max-tokens", 6, *extra]


# ---------------------------------------------------------------------------------------------------
# Data loss: an output that is also an input, or is not a regular file, is refused before any work
# ---------------------------------------------------------------------------------------------------

def test_out_over_the_reference_clip(work):
    refused(work, *rank("--out", "voice.wav"), words=["voice.wav", "is also an input"])


def test_out_over_the_checkpoint(work):
    refused(work, *rank("--out", "tiny.pt"), words=["tiny.pt", "is also an input"])


def test_out_over_the_text_file(work):
    (work / "one.txt").write_text("A single line, so the output is named exactly as given.\n")
    refused(work, "--text-file", "one.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--out", "one.txt",
            words=["is also an input"])


def test_out_over_an_input_by_another_path_or_link(work):
    os.mkdir(work / "sub")
    os.link(work / "voice.wav", work / "hard.wav")
    os.symlink("tiny.pt", work / "soft.pt")
    for out in ("sub/../voice.wav", str(work / "voice.wav"), "hard.wav", "soft.pt"):
        refused(work, *rank("--out", out), words=["is also an input"])


def test_out_onto_a_fifo_or_a_device(work):
    os.mkfifo(work / "fifo.npy")
    os.symlink("/dev/null", work / "null.npy")
    refused(work, *rank("--out", "fifo.npy"), words=["not a regular file"], process=True)
    refused(work, *rank("--out", "null.npy"), words=["not a regular file"], process=True)
    if os.geteuid() == 0:                                    # a copy of /dev/null, as the report made it
        os.mknod(work / "node.npy", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        refused(work, *rank("--out", "node.npy"), words=["not a regular file"], process=True)
        assert stat.S_ISCHR(os.lstat(work / "node.npy").st_mode)


def test_converter_output_over_an_input(work, tiny_hf_dir):
    (work / "a.pth").write_bytes(b"not read: refused before")
    (work / "c.pth").write_bytes(b"not read either")
    refused(work, "--tortoise-ar", "a.pth", "--tortoise-clvp", "c.pth", "-o", "a.pth", script="convert_weights.py",
            words=["is also an input"])
    refused(work, "--tortoise-ar", "a.pth", "--tortoise-clvp", "c.pth", "--tokenizer", "lines.txt", "-o",
            "lines.txt", script="convert_weights.py", words=["is also an input"])
    refused(work, "--hf", tiny_hf_dir, "-o", tiny_hf_dir / "model.safetensors", script="convert_weights.py",
            words=["model.safetensors", "is also an input"], also=[tiny_hf_dir])
    refused(work, "--hf", tiny_hf_dir, "-o", tiny_hf_dir / "config.json", script="convert_weights.py",
            words=["is also an input"], also=[tiny_hf_dir])


# ---------------------------------------------------------------------------------------------------
# Outputs checked before the work, and an error while writing still one line
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, words", [("missing/best.npy", "does not exist"), ("sub", "is a directory"),
                                        ("", "not a file name"), ("newdir/", "not a file name"),
                                        ("n" * 300 + ".npy", "file name too long")])
def test_bad_output_paths(work, out, words):
    os.mkdir(work / "sub")
    refused(work, *rank("--out", out), words=[words])
    (work / "a.pth").write_bytes(b"never read")
    refused(work, "--tortoise-ar", "a.pth", "--tortoise-clvp", "a.pth", "-o", out, script="convert_weights.py",
            words=[words if out else "-o PATH"])


def test_unwritable_directory(work):
    os.mkdir(work / "locked")
    os.chmod(work / "locked", 0o555)
    try:
        if os.access(work / "locked", os.W_OK):              # root writes anywhere: /proc refuses even root
            refused(work, *rank("--out", "/proc/best.npy"))
        else:
            refused(work, *rank("--out", "locked/best.npy"), words=["not writable"])
    finally:
        os.chmod(work / "locked", 0o755)


def small_files(limit):
    """A preexec_fn: the child may write files of at most `limit` bytes (a full disk, as the kernel says)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_full_disk_is_one_line_and_leaves_nothing(work, tiny_hf_dir):
    line = refused(work, *rank("--out", "best.npy"), preexec_fn=small_files(64), words=["best.npy", "File too large"])
    assert ".clvp-" not in line
    line = refused(work, "--hf", tiny_hf_dir, "-o", "clvp.pt", script="convert_weights.py",
                   preexec_fn=small_files(100_000), words=["clvp.pt", "File too large"], also=[tiny_hf_dir])
    assert ".clvp-" not in line                              # the user's path, not the hidden temporary file


def test_text_file_outputs_are_written_as_each_line_finishes(work, monkeypatch, capsys):
    """Documented behaviour: each line's output is complete as soon as that line is done; a failure on a
    later line leaves the earlier ones and says which they are."""
    writes = []
    real = clvp.write_atomically

    def second_fails(path, write):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device", ".clvp-x.tmp")
        return real(path, write)

    monkeypatch.setattr(clvp, "write_atomically", second_fails)
    monkeypatch.chdir(work)
    code = clvp.main(["--text-file", "lines.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--candidates",
                      "2", "--max-tokens", "6", "--out", "best.npy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "best-2.npy" in err[0] and "No space left" in err[0]
    assert "written before it: best-1.npy" in err[0]
    assert (work / "best-1.npy").exists() and not (work / "best-2.npy").exists()


# ---------------------------------------------------------------------------------------------------
# Memory and time bounded by the input's real size, never by its header
# ---------------------------------------------------------------------------------------------------

def wav_claiming(path, rate):
    """A valid 96 KB 16-bit WAV whose header then claims another sample rate."""
    soundfile.write(path, np.zeros(48000, np.int16), 22050, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:28] = rate.to_bytes(4, "little")                 # the fmt chunk's sample rate
    data[28:32] = min(rate * 2, 2**32 - 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [10_000_019, 2_147_483_647, 1])
def test_sample_rate_from_a_lying_header(work, rate):
    wav_claiming(work / "liar.wav", rate)
    refused(work, *rank("--audio", "liar.wav"), words=["liar.wav", f"{rate} Hz"])


def test_endless_or_huge_text_file(work):
    refused(work, *rank("--text-file", "/dev/zero")[2:], words=["/dev/zero", "not a regular file"], process=True)
    (work / "big.txt").write_bytes(b"word " * 300_000)
    refused(work, "--text-file", "big.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", words=["MiB"])


def test_a_million_character_word_is_refused_before_tokenizing(work):
    (work / "word.txt").write_text("a" * 1_000_000 + " | Hi.")      # '|': the user's parts, the word uncut
    line = refused(work, "--text-file", "word.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt",
                   words=["at most 401"])
    assert "at least" in line


def test_a_request_that_will_not_fit_says_what_it_needs(work):
    """Within the limits (1024 candidates per text), many lines decoded together can still not fit."""
    (work / "many.txt").write_text("A line to speak.\n" * 4000)
    refused(work, "--text-file", "many.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--candidates", 1024,
            "--batch-size", 1_000_000, words=["1024 candidates for each of 976 texts", "GiB", "KV cache"])


def test_check_memory_counts_the_cache_and_the_candidates(monkeypatch, tiny_checkpoint):
    model = clvp.load_model(tiny_checkpoint, "cpu")
    monkeypatch.setattr(clvp, "free_memory", lambda device: 2**30)
    clvp.check_memory(model, 10, clvp.DecodingOptions(num_candidates=16))
    with pytest.raises(ValueError, match=r"need about [0-9.]+ GiB .* of the 1.0 GiB free"):
        clvp.check_memory(model, 10, clvp.DecodingOptions(num_candidates=1_000_000))


def crafted(work, name, change, source="tiny.pt"):
    """A copy of a checkpoint with change(blob) applied, written as it is, unchecked."""
    blob = clvp.read_tensor_file(work / source, lambda blob: None)
    change(blob)
    clvp.write_tensor_file(work / name, blob)
    return name


def test_a_config_with_a_billion_layers_is_refused_at_once(work):
    name = crafted(work, "huge.pt", lambda b: b["config"]["decoder"].update(layers=10**9))
    refused(work, *rank("--checkpoint", name), words=["huge.pt", "config.decoder.layers", "1..1024"])


def test_fifos_are_refused_not_opened(work):
    os.mkfifo(work / "fifo")
    refused(work, *rank("--checkpoint", "fifo"), words=["not a regular file"], process=True)
    refused(work, *rank("--audio", "fifo"), words=["not a regular file"], process=True)
    refused(work, "--tortoise-ar", "fifo", "--tortoise-clvp", "fifo", "-o", "x.pt", script="convert_weights.py",
            words=["not a regular file"], process=True)


def test_only_the_first_seconds_of_a_long_clip_are_read(tmp_path):
    path = tmp_path / "long.wav"
    minutes = 10
    with soundfile.SoundFile(path, "w", 48000, 2, "PCM_16") as f:
        for _ in range(minutes * 6):
            f.write(np.zeros((480_000, 2), np.int16))
    tracemalloc.start()
    wav = clvp.load_audio(path, seconds=CLIPS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(wav) == CLIPS * clvp.SAMPLE_RATE
    assert peak < 40 * 2**20                                 # the whole file decoded would be 220 MiB


# ---------------------------------------------------------------------------------------------------
# A converted checkpoint validated whole before use; the converter never writes one that would fail
# ---------------------------------------------------------------------------------------------------

def nested(blob, path, value):
    keys = path.split(".")
    for k in keys[:-1]:
        blob = blob[k]
    if value is KeyError:
        del blob[keys[-1]]
    else:
        blob[keys[-1]] = value


BAD_BLOBS = [
    ("config.text.heads", KeyError, "missing ['heads']"),
    ("config.text.colour", 3, "unknown ['colour']"),
    ("config.decoder.heads", "4", "config.decoder.heads must be an integer"),
    ("config.decoder.heads", 4.0, "config.decoder.heads must be an integer"),
    ("config.decoder.heads", True, "config.decoder.heads must be an integer"),
    ("config.decoder.dim", 0, "config.decoder.dim must be an integer in 1.."),
    ("config.text.layers", -1, "config.text.layers must be an integer"),
    ("config.speech.vocab_size", 10**12, "config.speech.vocab_size must be an integer"),
    ("config.decoder.heads", 3, "decoder.heads must divide decoder.dim"),
    ("config.text.rotary_dim", 31, "text.rotary_dim must be even"),
    ("config.speech.rotary_dim", 64, "speech.rotary_dim must be even and at most a head's width (32)"),
    ("config.decoder.start_token", 9000, "start_token and stop_token must be two different ids"),
    ("config.decoder.text_stop_token", 300, "text_start_token and text_stop_token must be below"),
    ("config", [1, 2], "config must be a dict"),
    ("weights.logit_scale", torch.tensor(2), "logit_scale must hold floating-point numbers, not torch.int64"),
    ("weights.logit_scale", torch.tensor(True), "not torch.bool"),
    ("weights.logit_scale", torch.tensor(float("nan")), "logit_scale must hold finite numbers"),
    ("weights.decoder.text_embedding.weight", "inf", "decoder.text_embedding.weight must hold finite"),
    ("weights", [1], "weights: not a group of tensors"),
    ("weights", {"a": 1}, "weights: not a group of tensors"),
    ("tokenizer", "vocab", "tokenizer: not an object of vocab and merges"),
    ("tokenizer.vocab.[UNK]", KeyError, "the tokens [UNK] and [SPACE]"),
    ("tokenizer.vocab.[SPACE]", KeyError, "the tokens [UNK] and [SPACE]"),
    ("tokenizer.merges", [["q", "qq"]], "merge ['q', 'qq'] is not two tokens"),
    ("tokenizer.vocab.zz", 300, "ids up to 300"),
    ("mel_norms", torch.ones(79), "mel_norms must be 80 finite non-zero divisors"),
    ("mel_norms", torch.zeros(80), "mel_norms must be 80 finite non-zero divisors"),
    ("mel_norms", torch.full((80,), float("nan")), "mel_norms must be 80"),
    ("version", "2", "checkpoint format version '2'; this clvp.py reads version 2"),
    ("version", 3, "checkpoint format version 3"),
    ("mel_norms", [1.0] * 80, "mel_norms: not a tensor"),
    ("format", "other", "not a clvp checkpoint"),
]


@pytest.mark.parametrize("key, value, words", BAD_BLOBS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_BLOBS])
def test_bad_checkpoint(work, key, value, words):
    def change(blob):
        if key.startswith("weights."):                       # weight names hold dots: one level only
            name = key[len("weights."):]
            if isinstance(value, str):
                blob["weights"][name][0, 0] = float(value)
            else:
                blob["weights"][name] = value
        elif key.startswith("tokenizer.vocab."):              # so do some tokens
            token = key[len("tokenizer.vocab."):]
            if value is KeyError:
                del blob["tokenizer"]["vocab"][token]
            else:
                blob["tokenizer"]["vocab"][token] = value
        else:
            nested(blob, key, value)
    name = crafted(work, "bad.pt", change)
    refused(work, *rank("--checkpoint", name), words=["bad.pt: ", words])
    with pytest.raises(clvp.CheckpointError, match="bad.pt"):
        clvp.load_model(work / name, "cpu")


def test_save_checkpoint_refuses_what_load_model_would(tiny_checkpoint, tmp_path):
    model = clvp.load_model(tiny_checkpoint, "cpu")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["logit_scale"] = torch.tensor(float("inf"))
    with pytest.raises(clvp.CheckpointError, match="not written: .*logit_scale"):
        clvp.save_checkpoint(tmp_path / "x.pt", model.config, weights)
    with pytest.raises(clvp.CheckpointError, match="not written: mel_norms"):
        clvp.save_checkpoint(tmp_path / "x.pt", model.config, model.state_dict(), mel_norms=torch.zeros(80))
    assert os.listdir(tmp_path) == []


def safetensors_bytes(header, body=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def f32(offsets, shape=(1,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


# Lying headers. Each is refused by the one reader (clvp.read_tensor_file) before a tensor is allocated; the
# last few only mean something to a blob (clvp.pt, speak.pt), so the converter, which reads plain tensors,
# does not see them.
BAD_SAFETENSORS = [
    ("list header", safetensors_bytes([1, 2]), "not a JSON object"),
    ("empty file", b"", "a header of 0 bytes in a file of 0"),
    ("header past the end", (10**6).to_bytes(8, "little") + b"{}", "a header of 1000000 bytes in a file of 10"),
    ("header length 2^64-1", b"\xff" * 8 + b"{}", "over the 16 MiB"),
    ("not UTF-8", safetensors_bytes(b"\xff\xfe{}"), "not readable JSON"),
    ("nested 10^5 deep", safetensors_bytes(b"[" * 10**5 + b"]" * 10**5), "not readable JSON"),
    ("duplicate names", safetensors_bytes(b'{"a": %s, "a": %s}' % (json.dumps(f32([0, 4])).encode(),
                                                                   json.dumps(f32([4, 8])).encode()), b"\0" * 8),
     "the name 'a' appears twice"),
    ("negative offset", safetensors_bytes({"a": f32([-4, 0])}, b"\0" * 8), "tensor 'a' starts at byte -4"),
    ("offset past the end", safetensors_bytes({"a": f32([0, 16], [4])}, b"\0" * 8),
     "its tensors end at byte 16 of the data, which holds 8"),
    ("overlapping", safetensors_bytes({"a": f32([0, 8], [2]), "b": f32([4, 12], [2])}, b"\0" * 12),
     "tensor 'b' starts at byte 4 of the data, not at 8 where the one before it ends (a gap or an overlap)"),
    ("a gap", safetensors_bytes({"a": f32([0, 4]), "b": f32([8, 12])}, b"\0" * 12), "tensor 'b' starts at byte 8"),
    ("wrong size", safetensors_bytes({"a": f32([0, 8], [3])}, b"\0" * 8), "[3] is 12 bytes, not the 8 of its offsets"),
    ("unknown dtype", safetensors_bytes({"a": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
     "not a known dtype"),
    ("product overflows", safetensors_bytes({"a": f32([0, 4], [2**31 - 1] * 8)}, b"\0" * 4),
     f"is {(2**31 - 1)**8 * 4} bytes, not the 4"),
    ("a size of 2^40", safetensors_bytes({"a": f32([0, 4], [2**40, 0])}, b"\0" * 4), "sizes under 2^31"),
    ("a negative size", safetensors_bytes({"a": f32([0, 4], [-1])}, b"\0" * 4), "sizes under 2^31"),
    ("a size that is true", safetensors_bytes({"a": f32([0, 4], [True])}, b"\0" * 4), "sizes under 2^31"),
    ("an unknown field", safetensors_bytes({"a": {**f32([0, 4]), "x": 1}}, b"\0" * 4), "not a known dtype"),
    ("metadata of numbers", safetensors_bytes({"__metadata__": {"format": 1}}), "__metadata__ is not an object of texts"),
    ("metadata not JSON", safetensors_bytes({"__metadata__": {"format": "{clvp"}}),
     "__metadata__ 'format' is not JSON"),
    ("a tensor and a group", safetensors_bytes({"weights": f32([0, 4]), "weights.a": f32([4, 8])}, b"\0" * 8),
     "tensor 'weights.a' collides with the entry 'weights'"),
    ("a tensor into metadata", safetensors_bytes({"__metadata__": {"config": "{}"}, "config.a": f32([0, 4])},
                                                 b"\0" * 4), "tensor 'config.a' collides with the entry 'config'"),
]
BLOB_ONLY = 3                                        # the last cases, which only a blob's reader sees


@pytest.mark.parametrize("name, data, words", BAD_SAFETENSORS, ids=[c[0] for c in BAD_SAFETENSORS])
def test_bad_safetensors(work, tiny_hf_dir, name, data, words):
    (work / "bad.pt").write_bytes(data)
    refused(work, *rank("--checkpoint", "bad.pt"), words=["bad.pt: not a readable tensor file: ", words])
    tiny_speak_file(work / "speak.pt")
    refused(work, *speaking("--speak-checkpoint", "bad.pt", weights=True), script="speak.py", words=["bad.pt", words])
    if name not in [c[0] for c in BAD_SAFETENSORS[-BLOB_ONLY:]]:
        d = work / "hf"
        d.mkdir()
        shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
        (d / "model.safetensors").write_bytes(data)
        refused(work, "--hf", "hf", "-o", "out.pt", script="convert_weights.py", words=["model.safetensors", words])


def test_a_hundred_thousand_stray_tensors_are_one_short_line(work):
    """A header may name 10^5 tensors within its 16 MiB: refused from the header, named a few at a time."""
    crafted(work, "stray.pt", lambda b: b["weights"].update({f"stray{i}": torch.zeros(1) for i in range(100_000)}))
    line = refused(work, *rank("--checkpoint", "stray.pt"), words=["100000 unexpected tensor(s): stray0, stray1",
                                                                  "and 99992 more"])
    assert len(line) < 500, line


def test_a_header_of_100_mb_is_refused_unread(work):
    """The 8-byte length says 100 MB and the file holds them: refused from the length, in bounded memory."""
    with open(work / "big.pt", "wb") as f:
        f.write((10**8).to_bytes(8, "little") + b"{" + b" " * (10**8 - 2) + b"}")
    refused(work, *rank("--checkpoint", "big.pt"), words=["big.pt", "a header of 100000000 bytes, over the 16 MiB"],
            process=True)


def test_safetensors_files_agree_with_the_safetensors_library(tmp_path, tiny_checkpoint):
    """What clvp writes, the reference library reads, and the other way round, every dtype, byte for byte."""
    import safetensors.torch
    blob = clvp.read_tensor_file(tiny_checkpoint, lambda blob: None)
    theirs = safetensors.torch.load_file(tiny_checkpoint)
    assert set(theirs) == {f"weights.{k}" for k in blob["weights"]} | {"mel_norms"}
    assert all(torch.equal(theirs[f"weights.{k}"], v) for k, v in blob["weights"].items())
    with open(tiny_checkpoint, "rb") as f:                       # metadata: each entry JSON text
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(json.loads(f.read(n))["__metadata__"]["config"]) == blob["config"]
    tensors = {"f64": torch.randn(3, dtype=torch.float64), "bf16": torch.randn(2, 3).bfloat16(),
               "f16": torch.randn(5).half(), "i64": torch.arange(4), "i32": torch.arange(3, dtype=torch.int32),
               "i16": torch.arange(2, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
               "u8": torch.arange(7, dtype=torch.uint8), "bool": torch.tensor([True, False]), "scalar": torch.tensor(1.5),
               "empty": torch.zeros(0, 4)}
    safetensors.torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"k": "[1, 2]"})
    mine = clvp.read_tensor_file(tmp_path / "theirs.safetensors", lambda blob: None)
    assert mine["k"] == [1, 2] and all(torch.equal(mine[k], v) and mine[k].dtype == v.dtype for k, v in tensors.items())
    clvp.write_tensor_file(tmp_path / "mine.safetensors", {**tensors, "k": [1, 2]})
    back = safetensors.torch.load_file(tmp_path / "mine.safetensors")
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


BAD_HF_FILES = [
    ("model.safetensors.index.json", "{not json", "not readable JSON"),
    ("model.safetensors.index.json", '{"weight_map": [1]}', "weight_map must name shard files"),
    ("model.safetensors.index.json", '{"weight_map": {"a": "../../etc/passwd"}}', "weight_map must name shard files"),
    ("preprocessor_config.json", '{"mel_norms": ["a", "b"]}', "mel_norms is not a list of numbers"),
    ("preprocessor_config.json", json.dumps({"mel_norms": [0.0] * 80}), "not written: mel_norms"),
    ("preprocessor_config.json", "[1]", "not a JSON object"),
    ("vocab.json", '{"a": "x"}', "not a readable tokenizer"),
    ("config.json", json.dumps({"decoder_config": {}}), "not a CLVP config"),
]


@pytest.mark.parametrize("name, text, words", BAD_HF_FILES, ids=[f"{n}:{t}"[:40] for n, t, _ in BAD_HF_FILES])
def test_bad_hf_directory_files(work, tiny_hf_dir, name, text, words):
    d = work / "hf"
    shutil.copytree(tiny_hf_dir, d)
    (d / name).write_text(text)
    if name == "vocab.json":
        (d / "merges.txt").write_text("#version: 0.2\n")
    refused(work, "--hf", "hf", "-o", "out.pt", script="convert_weights.py", words=[words])


def test_hf_config_with_a_billion_layers(work, tiny_hf_dir):
    d = work / "hf"
    shutil.copytree(tiny_hf_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["decoder_config"]["num_hidden_layers"] = 10**9
    (d / "config.json").write_text(json.dumps(config))
    refused(work, "--hf", "hf", "-o", "out.pt", script="convert_weights.py", words=["config.decoder.layers"])


# ---------------------------------------------------------------------------------------------------
# Values that pass a simple check but used to crash: accepted when they work, refused with the range
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("--temperature", "inf", "--temperature must be 0 (greedy) or a finite positive number"),
    ("--temperature", "nan", "--temperature must be"), ("--temperature", "-1", "--temperature must be"),
    ("--repetition-penalty", "0", "--repetition-penalty must be a finite positive number"),
    ("--repetition-penalty", "inf", "--repetition-penalty must be"),
    ("--temperature", "1e-300", "that float32 holds"), ("--temperature", "1e39", "that float32 holds"),
    ("--repetition-penalty", "1e-46", "--repetition-penalty must be a finite positive number that float32 holds"),
    ("--seed", str(2**64), "--seed must be None or an integer in 0..2**64-1"), ("--seed", "-1", "--seed must be"),
    ("--top-p", "0", "--top-p must be in (0, 1]"), ("--top-p", "1.5", "--top-p"), ("--top-k", "0", "--top-k"),
    ("--typical-mass", "0", "--typical-mass"), ("--candidates", "0", "--candidates"),
    ("--batch-size", "-3", "--batch-size"), ("--max-tokens", "0", "--max-tokens"),
    ("--max-tokens", "5000", "--max-tokens must be an integer in 1..607"), ("--candidates", "many", "invalid int"),
    ("--cache-dtype", "int8", "--cache-dtype: invalid choice: 'int8'"),
])
def test_bad_numbers(work, flag, value, words):
    refused(work, *rank(flag, value), words=[words])


def test_the_engine_choice_and_what_only_the_engine_has(work, tiny_checkpoint, monkeypatch):
    """--engine takes fast or lesson; the lesson's cache is in the model's dtype, so --cache-dtype with it is a
    mistake, named; the library says the same; a request the lesson cannot hold is refused with its figure."""
    refused(work, *rank("--engine", "turbo"), words=["--engine: invalid choice: 'turbo'"])
    refused(work, *rank("--engine", "lesson", "--cache-dtype", "bfloat16"),
            words=["--cache-dtype must be unset with the lesson's engine"])
    model = clvp.load_model(tiny_checkpoint, "cpu")
    for bad, words in [(dict(engine="turbo"), "engine must be one of fast, lesson, not 'turbo'"),
                       (dict(engine="lesson", cache_dtype="float16"), "cache_dtype must be unset")]:
        with pytest.raises(clvp.InputError, match=words):
            model.generate(torch.tensor([5, 6]), MELS, **bad)
    monkeypatch.setattr(clvp, "free_memory", lambda device: 2**30)
    clvp.check_memory(model, 10, clvp.DecodingOptions(num_candidates=16, engine="lesson"))
    with pytest.raises(ValueError, match=r"need about [0-9.]+ GiB \(KV cache"):
        clvp.check_memory(model, 10, clvp.DecodingOptions(num_candidates=1024, batch_size=10**6, engine="lesson"))


def test_bench_needs_a_step_to_time(work):
    refused(work, "--tiny", "--tokens", 1, script="bench.py", words=["--tokens must be in 2..600"])
    refused(work, "--tiny", "--candidates", 10**9, script="bench.py", words=["--candidates must be in 1..1024"])


# ---------------------------------------------------------------------------------------------------
# The download keeps what it fetched only when it is the file
# ---------------------------------------------------------------------------------------------------

def test_an_html_page_is_not_kept_as_the_weights(work, hub_server):
    page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    hub_server.files.update({"autoregressive.pth": page, "clvp2.pth": page, "tokenizer.json": page,
                             "mel_norms.pth": page})
    env = {"CLVP_HUB_URL": hub_server.url, "CLVP_CACHE": str(work / "cache")}
    (work / "cache").mkdir()
    line = refused(work, "--download", script="convert_weights.py", env=env, words=["not a torch archive"])
    assert "DOCTYPE" in line and "nothing was kept" in line
    assert [p.name for p in (work / "cache").iterdir()] == []


def test_a_bad_file_already_in_the_cache_is_named(work):
    cache = work / "cache"
    cache.mkdir()
    (cache / "autoregressive.pth").write_text("<html>old failed download</html>")
    env = {"CLVP_HUB_URL": "http://127.0.0.1:9", "CLVP_CACHE": str(cache)}
    refused(work, "--download", script="convert_weights.py", env=env,
            words=["autoregressive.pth: not a torch archive", "delete it and run again"])


def test_hub_url_without_a_scheme(work):
    refused(work, "--download", script="convert_weights.py", env={"CLVP_HUB_URL": "example.com/models",
                                                                   "CLVP_CACHE": str(work / "cache")},
            words=["CLVP_HUB_URL='example.com/models' is not an http:// or https:// URL"])


# ---------------------------------------------------------------------------------------------------
# Messages that say what is really wrong, in one line
# ---------------------------------------------------------------------------------------------------

def test_what_an_audio_path_really_is(work):
    os.mkdir(work / "clips")
    os.symlink("loop.wav", work / "loop.wav")
    refused(work, *rank("--audio", "clips"), words=["clips: is a directory"])
    refused(work, *rank("--audio", "loop.wav"), words=["loop.wav: Too many levels of symbolic links"])
    refused(work, *rank("--audio", "missing.wav"), words=["missing.wav: no such file"])


def test_no_checkpoint_is_one_line(work):
    refused(work, "--text", "Hi.", "--audio", "voice.wav", env={"CLVP_CACHE": str(work / "empty")},
            words=["python convert_weights.py --download"])


def test_a_warning_does_not_make_an_error_two_lines(work):
    soundfile.write(work / "silent.wav", np.zeros(50_000, np.float32), 22050)
    refused(work, *rank("--audio", "silent.wav", "--out", "best.npy"), preexec_fn=small_files(64),
            words=["File too large"])


@pytest.mark.parametrize("text", ["中文字符 Москва", "  ", '""', "🎉 🎉"])
def test_text_that_cleans_to_nothing(work, text):
    refused(work, *rank("--text", text), words=["empty"])


def test_a_part_too_long_for_the_model_is_named(work):
    """A long text is cut into parts that fit; a part the user cut with '|' is theirs, and one too long is
    refused, by its first words (and its line in a file), with how to cut it."""
    line = refused(work, *rank("--text", "Fine. | " + "word " * 300 + "| Fine too."),
                   words=["'word word word", "at most 401", "cut it into shorter parts with '|'"])
    assert "one per line" not in line
    (work / "long.txt").write_text("Fine.\n\n" + "More words here. " * 200 + "\n" + "words " * 300 + "| Fine.\n")
    refused(work, "--text-file", "long.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt",
            words=["long.txt, line 4: the text 'words words", "at most 401"])


@pytest.mark.parametrize("text", ["|||", " | | ", "...", "?! ... ,;: !!!"])
def test_a_text_with_nothing_to_say(work, text):
    refused(work, *rank("--text", text), words=["nothing to say", repr(text)])
    (work / "nothing.txt").write_text(f"{text}\n\n{text}\n")
    refused(work, "--text-file", "nothing.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt",
            words=["nothing.txt: the text has nothing to say"])


# ---------------------------------------------------------------------------------------------------
# The library API: each public function checks its arguments and names them
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return clvp.load_model(tiny_checkpoint, "cpu")


MELS = torch.zeros(1, 80, 40)


@pytest.mark.parametrize("call, words", [
    (lambda m: m.text_features(torch.tensor([[5, 300]])), "text_ids must be ids in 0..255"),
    (lambda m: m.text_features(torch.tensor([5, 6])), "text_ids must be integer ids [batch"),
    (lambda m: m.text_features(torch.tensor([[0.5]])), "text_ids must be integer ids"),
    (lambda m: m.speech_features(torch.tensor([[9000]])), "speech_ids must be ids in 0..8191"),
    (lambda m: m.text_features(torch.zeros(1, 405, dtype=torch.long)), "text_ids must be integer ids [batch, 1..404"),
    (lambda m: m.speech_features(torch.zeros(1, 10**6, dtype=torch.long)), "speech_ids must be integer ids [batch, 1..608"),
    (lambda m: m.similarity(torch.tensor([[-1]]), torch.tensor([[3]])), "text_ids must be ids in 0..255"),
    (lambda m: m.generate(torch.tensor([256]), MELS), "text_ids must be ids in 0..255"),
    (lambda m: m.generate(torch.ones(500, dtype=torch.long), MELS), "text_ids must be integer ids [batch, 1..401"),
    (lambda m: m.generate(torch.ones(2, 5, dtype=torch.long), MELS), "generate takes one text"),
    (lambda m: m.generate([1, 2], MELS), "text_ids must be integer ids"),
    (lambda m: m.generate([], MELS), "or a non-empty list of them"),
    (lambda m: m.generate([torch.tensor([5]), "hello"], MELS), "or a non-empty list of them"),
    (lambda m: m.generate([torch.tensor([5]), torch.tensor([300])], MELS), "text_ids must be ids in 0..255"),
    (lambda m: m.generate([torch.tensor([5]), torch.ones(2, 3, dtype=torch.long)], MELS), "give several texts as a list"),
    (lambda m: m.generate(torch.tensor([5]), torch.zeros(80, 40)), "mels must be floats [clips, 80, frames]"),
    (lambda m: m.generate(torch.tensor([5]), torch.zeros(1, 81, 40)), "mels must be floats"),
    (lambda m: m.generate(torch.tensor([5]), torch.zeros(1, 80, 40, dtype=torch.long)), "mels must be floats"),
    (lambda m: m.generate(torch.tensor([5]), torch.full((1, 80, 40), math.nan)), "mels hold NaN"),
    (lambda m: m.conditioning_latent(torch.zeros(1, 80, 0)), "mels must be floats"),
    (lambda m: m.generate(torch.tensor([5]), MELS, num_candidates=0), "num_candidates must be an integer in 1.."),
    (lambda m: m.generate(torch.tensor([5]), MELS, batch_size=0), "batch_size must be"),
    (lambda m: m.generate(torch.tensor([5]), MELS, max_new_tokens=0), "max_new_tokens must be an integer in 1..607"),
    (lambda m: m.generate(torch.tensor([5]), MELS, max_new_tokens=608), "max_new_tokens must be"),
    (lambda m: m.generate(torch.tensor([5]), MELS, top_k=0), "top_k must be"),
    (lambda m: m.generate(torch.tensor([5]), MELS, temperature=math.inf), "temperature must be"),
    (lambda m: m.speech_logits(MELS, torch.tensor([[5]]), torch.tensor([[8194]])), "speech_ids must be ids in 0..8193"),
    (lambda m: m.speech_logits(MELS, torch.tensor([[5]]), torch.zeros(1, 607, dtype=torch.long)),
     "speech_ids must be integer ids [batch, 0..606"),
    (lambda m: clvp.log_mel_spectrogram(torch.zeros(5000, dtype=torch.long)), "wav must be floats"),
    (lambda m: clvp.log_mel_spectrogram(torch.zeros(1, 1, 5000)), "wav must be floats"),
    (lambda m: clvp.log_mel_spectrogram(torch.zeros(5000), torch.ones(3)), "mel_norms must be 80 finite non-zero divisors"),
    (lambda m: clvp.resolve_device("tpu9"), "unknown device 'tpu9'"),
    (lambda m: clvp.load_audio(os.path.join(HERE, "examples", "voice.wav"), sampling_rate=0), "sampling_rate must be"),
    (lambda m: clvp.resolve_device("meta"), "unsupported device 'meta'"),
])
def test_api_arguments(model, call, words):
    with pytest.raises(ValueError) as e:
        call(model)
    assert words in str(e.value), str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_api_cuda_without_cuda(tiny_checkpoint):
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        clvp.load_model(tiny_checkpoint, "cuda")


def test_api_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "bad.json").write_text('{"model": {"vocab": {"a": 1}, "merges": []}}')
    for path, words in ((tmp_path / "fifo", "not a regular file"), (tmp_path / "bad.json", "[UNK] and [SPACE]"),
                        (tmp_path, "is a directory"), (tmp_path / "none.json", "no such file")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            clvp.Tokenizer.from_file(path)
    with pytest.raises(clvp.AudioError, match="not a regular file"):
        clvp.load_audio(tmp_path / "fifo")
    with pytest.raises(clvp.CheckpointError, match="not a regular file"):
        clvp.load_model(tmp_path / "fifo", "cpu")


# ---------------------------------------------------------------------------------------------------
# Valid runs: the checks refuse nothing that works
# ---------------------------------------------------------------------------------------------------

def accepted(work, *args, script="clvp.py", env=None):
    code, out, err, seconds, mib = run_case(work, script, args, env, seconds=SECONDS)
    assert code == 0, err[-3000:]
    return out


def test_extreme_values_that_work(work):
    for extra in (["--temperature", "1e-40"], ["--repetition-penalty", "1e-45"], ["--temperature", "1e30"],
                  ["--seed", str(2**64 - 1)], ["--top-k", "50"], ["--max-tokens", "607", "--candidates", "1"]):
        out = accepted(work, *rank("--json", "--out", "best.npy", *extra))
        scores = json.loads(out)["results"][0]["scores"]
        assert all(math.isfinite(s) for s in scores)


def test_writing_over_an_earlier_output_and_a_text_file(work):
    accepted(work, *rank("--out", "best.npy"))
    accepted(work, *rank("--out", "best.npy"))                # an output of an earlier run is not an input
    (work / "out").mkdir()
    accepted(work, "--text-file", "lines.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--candidates", 2,
             "--max-tokens", 6, "--out", "out/b.npy")
    assert sorted(os.listdir(work / "out")) == ["b-1.npy", "b-2.npy"]


@pytest.mark.parametrize("rate, channels, seconds", [(8000, 1, 2), (48000, 2, 60), (384000, 1, 1), (1000, 6, 8)])
def test_audio_that_works(work, rate, channels, seconds):
    t = np.arange(rate * seconds) / rate
    clip = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None].repeat(channels, axis=1)
    soundfile.write(work / "clip.wav", clip.astype(np.float32), rate)
    accepted(work, *rank("--audio", "clip.wav", "--out", "best.npy"))


def test_converter_writes_beside_its_inputs(work, tiny_hf_dir):
    d = work / "hf"
    shutil.copytree(tiny_hf_dir, d)
    accepted(work, "--hf", "hf", "-o", "hf/clvp.pt", script="convert_weights.py")
    accepted(work, "--hf", "hf", "-o", "hf/clvp.pt", script="convert_weights.py")    # again: not one of its inputs
    assert clvp.load_model(d / "clvp.pt", "cpu").config.decoder.dim == 64


# ---------------------------------------------------------------------------------------------------
# Moved from test_clvp.py: bad audio files, bad checkpoints and bad arguments, through the API and main()
# ---------------------------------------------------------------------------------------------------

VOICE = os.path.join(HERE, "examples", "voice.wav")


def sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def run_main(capsys, *args):
    code = clvp.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def expect_audio_error(path, *words):
    with pytest.raises(clvp.AudioError) as info:
        clvp.load_audio(str(path))
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_file(tmp_path):
    expect_audio_error(tmp_path / "nope.wav", "no such file")


def test_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file, not a RIFF/WAVE stream\n")
    expect_audio_error(path, "not a readable audio file")


def test_directory_is_not_a_file(tmp_path):
    expect_audio_error(tmp_path, "is a directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, np.float32), clvp.SAMPLE_RATE)
    expect_audio_error(path, "empty")


def test_one_sample_file(tmp_path):
    path = tmp_path / "one.wav"
    soundfile.write(path, np.array([0.5], np.float32), clvp.SAMPLE_RATE)
    expect_audio_error(path, "too short", str(clvp.MIN_SAMPLES))


def test_short_after_resampling(tmp_path):
    path = tmp_path / "short48k.wav"  # 1000 samples at 48 kHz -> 460 at 22050: below the minimum
    soundfile.write(path, sine(440, 48000, 1000 / 48000), 48000)
    expect_audio_error(path, "too short", "460")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    x = sine(440, clvp.SAMPLE_RATE)
    x[100] = bad
    path = tmp_path / "bad.wav"
    soundfile.write(path, x, clvp.SAMPLE_RATE, subtype="FLOAT")
    expect_audio_error(path, "NaN or Inf")


def test_load_model_bad_files(tiny_checkpoint, tmp_path):
    good = tmp_path / "good.pt"
    good.write_bytes(open(tiny_checkpoint, "rb").read())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:10000])
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    other = tmp_path / "other.pt"
    clvp.write_tensor_file(other, {"a": torch.zeros(1)})
    old = tmp_path / "old.pt"
    torch.save({"format": "clvp", "version": 1}, old)
    blob = clvp.read_tensor_file(good, lambda blob: None)
    del blob["weights"]["decoder.head.bias"]
    blob["weights"]["logit_scale"] = torch.zeros(3)
    broken = tmp_path / "broken.pt"
    clvp.write_tensor_file(broken, blob)
    cases = [(truncated, "not a readable tensor file"), (text, "not a readable"), (other, "not a clvp checkpoint"),
             (old, "convert_weights.py --upgrade"), (tmp_path / "missing.pt", "no such file"), (tmp_path, "directory")]
    for path, words in cases:
        with pytest.raises(clvp.CheckpointError, match=words):
            clvp.load_model(path, "cpu")
    with pytest.raises(clvp.CheckpointError) as e:
        clvp.load_model(broken, "cpu")
    assert "missing: decoder.head.bias" in str(e.value) and "logit_scale is [3], expected []" in str(e.value)
    assert clvp.load_model(good, "cpu").tokenizer.encode("Hello world") == [62, 84, 28, 2, 179, 79]


@pytest.mark.parametrize("args, words", [
    (["--text", "", "--audio", VOICE], "text is empty"),
    (["--text", "   ", "--audio", VOICE], "text is empty"),
    (["--text", "\"\"", "--audio", VOICE], "empty after cleaning"),
    (["--text", "word " * 300 + "| Hi.", "--audio", VOICE], "at most 401"),
    (["--text", " | |||", "--audio", VOICE], "nothing to say"),
    (["--text", "... ?! ,;:", "--audio", VOICE], "nothing to say"),
    (["--text", "1" * 40, "--audio", VOICE], "cannot read the text"),
    (["--text", "Hi.", "--audio", "missing.wav"], "missing.wav: no such file"),
    (["--text", "Hi.", "--audio", __file__], "not a readable audio file"),
    (["--text", "Hi.", "--audio", VOICE, "--candidates", 0], "--candidates"),
    (["--text", "Hi.", "--audio", VOICE, "--batch-size", 0], "--batch-size"),
    (["--text", "Hi.", "--audio", VOICE, "--batch-size", -3], "--batch-size"),
    (["--text", "Hi.", "--audio", VOICE, "--top-p", 0], "--top-p"),
    (["--text", "Hi.", "--audio", VOICE, "--top-p", 1.5], "--top-p"),
    (["--text", "Hi.", "--audio", VOICE, "--temperature", -1], "--temperature"),
    (["--text", "Hi.", "--audio", VOICE, "--device", "tpu9"], "device"),
    (["--text", "Hi.", "--audio", VOICE, "--device", "cuda"], "CUDA"),
    (["--text", "Hi.", "--audio", VOICE, "--max-tokens", 5000], "--max-tokens"),
    (["--text", "Hi.", "--audio", VOICE, "--candidates", "many"], "invalid int"),
    (["--text", "Hi."], "--audio"),
    (["--audio", VOICE], "--text"),
])
def test_cli_bad_input(tiny_checkpoint, tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "--checkpoint", tiny_checkpoint, "--max-tokens", 8, "--candidates", 1, *args)
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert os.listdir(tmp_path) == []                            # no output file, no temporary left


def test_cli_bad_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, err = run_main(capsys, "--text", "Hi.", "--audio", VOICE, "--checkpoint", bad)
    assert code == 2 and len(err) == 1 and "bad.pt: not a readable tensor file" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]


# ---------------------------------------------------------------------------------------------------
# Second round (issue 17), first classes: the last safety net, and values valid in one dtype only
# ---------------------------------------------------------------------------------------------------

def test_a_bug_is_one_line_with_exit_code_1(capsys, monkeypatch):
    """An exception that is no user's mistake still ends in one line, exit 1, with the hint; with
    CLVP_TRACEBACK=1 it propagates, traceback and all."""
    def broken():
        raise RuntimeError("something deep\nsecond line")
    assert clvp.run_command("x.py", broken) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error" in err[0] and "RuntimeError: something deep" in err[0] \
        and "CLVP_TRACEBACK=1" in err[0], err
    monkeypatch.setenv("CLVP_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something deep"):
        clvp.run_command("x.py", broken)


def test_uint8_ids_are_accepted_and_their_range_is_read_as_integers(model):
    ids = torch.tensor([[5, 200, 255]], dtype=torch.uint8)
    assert torch.equal(model.text_features(ids), model.text_features(ids.long()))
    with pytest.raises(clvp.InputError, match=r"speech_ids must be ids in 0..8191, not 0..8192"):
        model.speech_features(torch.tensor([[0, 8192]], dtype=torch.int16))


@pytest.mark.parametrize("call, words", [
    (lambda m: clvp.log_mel_spectrogram(torch.zeros(5000, dtype=torch.float16)), "float32 or float64"),
    (lambda m: clvp.log_mel_spectrogram(torch.zeros(5000, dtype=torch.bfloat16)), "float32 or float64"),
    (lambda m: clvp.log_mel_spectrogram(torch.zeros(0, 5000)), "wav must be floats"),
    (lambda m: m.speech_logits(MELS, torch.ones(2, 3, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)),
     "text_ids has 2 rows and speech_ids 3"),
    (lambda m: m.generate(torch.tensor([5]), MELS, temperature=1e-300), "that float32 holds"),
    (lambda m: m.generate(torch.tensor([5]), MELS, repetition_penalty=10**400), "that float32 holds"),
    (lambda m: m.generate(torch.tensor([5]), MELS, no_such_option=1), "unknown options ['no_such_option']"),
    (lambda m: m.generate(torch.tensor([5]), MELS, options="fast"), "options must be a DecodingOptions"),
])
def test_api_values_torch_cannot_take(model, call, words):
    with pytest.raises(clvp.InputError) as e:
        call(model)
    assert words in str(e.value), str(e.value)


def test_deeply_nested_json_is_one_line(work):
    (work / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(clvp.InputError, match="not readable JSON"):
        clvp.Tokenizer.from_file(work / "deep.json")
    hf = work / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    (hf / "model.safetensors").write_bytes(b"")
    refused(work, "--hf", "hf", "-o", "out.pt", script="convert_weights.py", words=["config.json: not readable JSON"])


# ---------------------------------------------------------------------------------------------------
# Second round (issue 17), by mechanism. 1. The input registry: no output may be a file the run reads by
# itself (data/, examples/, the project's source). These run a copy of the project, so a regression
# clobbers the copy, never this checkout.
# ---------------------------------------------------------------------------------------------------

NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}                 # importing clvp must not change the copy


@pytest.fixture
def project(tmp_path, tiny_checkpoint):
    """A copy of the project (its source, data/ and examples/) beside a user's folder `work`."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in os.listdir(HERE):
        if name.endswith((".py", ".md", ".txt")):
            shutil.copy(os.path.join(HERE, name), copy / name)
    for folder in ("data", "examples"):
        shutil.copytree(os.path.join(HERE, folder), copy / folder)
    shutil.copy(tiny_checkpoint, copy / "tiny.pt")
    shutil.copy(os.path.join(HERE, "examples", "voice.wav"), copy / "voice.wav")
    return copy


@pytest.mark.parametrize("script, args", [
    ("clvp.py", ["--random-init", "--tiny", "--text", "Hi.", "--audio", "voice.wav", "--out"]),
    ("speak.py", ["--random-init", "--tiny", "--text", "Hi.", "--audio", "voice.wav", "--out"]),
    ("train.py", ["--encoder-steps", "1", "--decoder-steps", "1", "--out"]),
    ("convert_weights.py", ["--tortoise-ar", "tiny.pt", "--tortoise-clvp", "tiny.pt", "-o"]),
])
@pytest.mark.parametrize("target", ["data/tokenizer.json", "data/mel_norms.safetensors", "examples/voice.wav", "clvp.py",
                                    "./speak.py", "README.md", "requirements-dev.txt"])
def test_no_output_over_a_file_of_the_project(project, script, args, target):
    refused(project, *args, target, script=str(project / script), env=NO_PYC,       # named as an input, or as
            words=[os.path.basename(target), "refusing to write over it"])            # a file of this project


def test_project_files_by_a_link_or_another_path(project):
    os.symlink(project / "clvp.py", project / "link.npy")
    os.link(project / "data" / "tokenizer.json", project / "hard.npy")
    run = ["--random-init", "--tiny", "--text", "Hi.", "--audio", "voice.wav", "--out"]
    for out in ("link.npy", "hard.npy", "data/../clvp.py", str(project / "examples" / "voice.wav")):
        refused(project, *run, out, script=str(project / "clvp.py"), env=NO_PYC, words=["a file of this project"])


def test_earlier_outputs_in_the_project_folder_are_still_replaced(project):
    run = ["--random-init", "--tiny", "--text", "Hi.", "--audio", "voice.wav", "--candidates", 2, "--max-tokens", 4,
           "--quiet", "--out", "best.npy"]
    for _ in range(2):
        code, _, err, _, _ = run_bounded([sys.executable, str(project / "clvp.py"), *map(str, run)], project)
        assert code == 0, err
    assert np.load(project / "best.npy").shape[0] == 1


# ---------------------------------------------------------------------------------------------------
# 2. One opener: every file is opened by the project and handed on as a file object, so a name means
# only that file ('-', '.raw', a name that is not UTF-8), and the download cache never follows a link.
# ---------------------------------------------------------------------------------------------------

def test_a_file_named_dash_is_that_file_not_standard_input(work):
    shutil.copy(work / "voice.wav", work / "-")
    accepted(work, *rank("--audio", "-", "--out", "dash.npy"))
    os.remove(work / "-")
    refused(work, *rank("--audio", "-"), words=["-: no such file"])


def test_the_extension_does_not_choose_the_format(work):
    shutil.copy(work / "voice.wav", work / "voice.raw")
    accepted(work, *rank("--audio", "voice.raw", "--out", "raw.npy"))
    (work / "noise.raw").write_bytes(os.urandom(20000))
    refused(work, *rank("--audio", "noise.raw"), words=["noise.raw: not a readable audio file"])


def test_names_that_are_not_utf8_and_a_terminal_that_is_not_either(work):
    name = os.fsdecode(b"\xff\xfe.wav")
    shutil.copy(work / "voice.wav", work / name)
    out = os.fsdecode(b"best-\xff.npy")
    code, stdout, err, _, _ = run_bounded([sys.executable, os.path.join(HERE, "clvp.py"),
                                           *map(str, rank("--audio", name, "--out", out, "--quiet"))], work,
                                          env={"LC_ALL": "C", "PYTHONIOENCODING": "ascii:strict"})
    assert code == 0 and err == "" and os.path.exists(work / out), err
    assert "written to best-\\udcff.npy" in stdout, stdout
    refused(work, *rank("--audio", os.fsdecode(b"gone-\xff.wav")), env={"LC_ALL": "C"}, words=["no such file"])


def mp3_with_garbage(path):
    """An MP3 whose frames are broken: libmpg123 writes its own notes to stderr while it resyncs."""
    soundfile.write(path, np.sin(np.arange(22050) / 10).astype(np.float32) * 0.3, 22050, format="MP3")
    data = bytearray(path.read_bytes())
    data[2000:5000] = np.random.default_rng(0).bytes(3000)
    path.write_bytes(bytes(data))


def test_a_c_library_writing_to_stderr_does_not_make_two_lines(work):
    mp3_with_garbage(work / "broken.mp3")
    (work / "frames.mp3").write_bytes((b"\xff\xfb\x90\x00" + np.random.default_rng(1).bytes(400)) * 20)
    for name in ("broken.mp3", "frames.mp3"):
        read = subprocess.run([sys.executable, "-c", "import soundfile, sys; soundfile.read(sys.argv[1])", name],
                              cwd=work, capture_output=True, text=True)
        assert "libmpg123" in read.stderr or "Note:" in read.stderr, read.stderr   # the notes are there to keep off
        refused(work, *rank("--audio", name), words=[f"{name}: not a readable audio file"])


def test_a_part_file_that_is_a_link_is_never_written_through(work, hub_server):
    hub_server.files.update({name: b"PK\x03\x04" + bytes(100) for name in ("autoregressive.pth", "clvp2.pth")})
    cache, victim = work / "cache", work / "precious.txt"
    cache.mkdir()
    victim.write_text("a user's file\n")
    os.symlink(victim, cache / "autoregressive.pth.part")
    env = {"CLVP_HUB_URL": hub_server.url, "CLVP_CACHE": str(cache)}
    refused(work, "--download", script="convert_weights.py", env=env, words=["autoregressive.pth.part"])
    assert victim.read_text() == "a user's file\n" and hub_server.requests == []


@pytest.mark.parametrize("name", ["autoregressive.pth", "autoregressive.pth.part", "tokenizer.json"])
def test_a_fifo_in_the_cache_is_refused_not_waited_on(work, hub_server, name):
    hub_server.files.update({n: b"" for n in ("autoregressive.pth", "clvp2.pth", "tokenizer.json", "mel_norms.pth")})
    cache = work / "cache"
    cache.mkdir()
    os.mkfifo(cache / name)
    env = {"CLVP_HUB_URL": hub_server.url, "CLVP_CACHE": str(cache)}
    if name == "tokenizer.json":                              # the two weights are there and whole already
        for n in ("autoregressive.pth", "clvp2.pth"):
            torch.save({"a": torch.zeros(1)}, cache / n)
    refused(work, "--download", script="convert_weights.py", env=env, words=[name], process=True)


# ---------------------------------------------------------------------------------------------------
# 3. Bounds from the raw input, before the work: linear cleaners, archive records against the file's
# size, and documented limits on candidates and clips.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["1" * 2**20, "1." * 2**19, "12" * 2**19 + "st", "$" + "9" * 2**20, "1," * 2**19])
def test_the_cleaners_run_in_linear_time_on_long_runs_of_digits(text):
    """A bound against hours, not a benchmark: the quadratic rules took minutes on 200,000 digits."""
    start = time.perf_counter()
    try:
        clvp.clean_text(text)
    except ValueError as e:
        assert "more than 36 digits" in str(e)
    assert time.perf_counter() - start < 10


def test_a_megabyte_of_short_lines_has_its_outputs_checked_in_one_pass(work):
    """262,143 lines, so 262,143 outputs, each compared with every input and project file: once per source,
    not once per line (which took minutes). The last one is the voice clip, hard-linked."""
    (work / "short.txt").write_text("Hi.\n" * (2**20 // 4 - 1))
    os.link(work / "voice.wav", work / "o-262143.npy")
    refused(work, "--text-file", "short.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--out", "o.npy",
            words=["o-262143.npy: is also an input (voice.wav)"])


@pytest.mark.parametrize("char, words", [('"', "empty after cleaning"), ("!", "nothing to say"), (",", "nothing to say"),
                                         ("|", "nothing to say"), ("\u201d", "empty after cleaning")])
def test_a_megabyte_text_of_one_character_splits_at_once(work, char, words):
    """No space and no sentence end (or nothing else): the splitter walks it once, stepping back at most
    300 characters per cut; all quotes make parts of quotes (nothing to speak), punctuation and '|' no part."""
    (work / "one.txt").write_text(char * (clvp.MAX_TEXT_BYTES // len(char.encode()) - 1))
    refused(work, "--text-file", "one.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", words=[words])


def test_a_megabyte_word_is_split_at_once_into_its_parts(work):
    """A megabyte 'word' is cut every 200 characters, as the original cuts it: 5,243 parts, whose outputs are
    all checked (the last one is the voice clip, hard-linked) within the time bound."""
    text = "a" * (clvp.MAX_TEXT_BYTES - 1)
    n = len(clvp.split_text(text))
    assert n == 5243
    (work / "word.txt").write_text(text)
    os.link(work / "voice.wav", work / f"o-{n}.npy")
    refused(work, "--text-file", "word.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--out", "o.npy",
            words=[f"o-{n}.npy: is also an input (voice.wav)"])


def test_a_text_file_of_digits_is_refused_at_once(work):
    (work / "digits.txt").write_text("7" * (2**20 - 1))
    line = refused(work, "--text-file", "digits.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt",
                   words=["more than 36 digits"])
    assert "Exceeds the limit" not in line


def compressed_checkpoint(work, name, inflated=1_200_000_000):
    """A torch.save file with one record replaced by `inflated` zero bytes, deflate-compressed: 1.2 MB on disk."""
    import zipfile
    torch.save({"x": torch.zeros(1000)}, work / "plain.pth")
    with zipfile.ZipFile(work / "plain.pth") as src, zipfile.ZipFile(work / name, "w", zipfile.ZIP_DEFLATED) as out:
        for record in src.infolist():
            data = src.read(record)
            with out.open(record.filename, "w", force_zip64=True) as f:
                if record.filename.endswith("/data/0"):
                    for _ in range(inflated // 2**24):
                        f.write(bytes(2**24))
                else:
                    f.write(data)
    assert os.path.getsize(work / name) < 2 * 2**20
    return name


def test_a_compressed_record_is_refused_before_it_inflates(work):
    compressed_checkpoint(work, "bomb.pt")
    (work / "small.pt").write_bytes(b"not a zip")
    peaks = {}
    for name, args, script in [("bomb", rank("--checkpoint", "bomb.pt"), "clvp.py"),
                               ("base", rank("--checkpoint", "small.pt"), "clvp.py"),
                               ("convert", ["--tortoise-ar", "bomb.pt", "--tortoise-clvp", "tiny.pt", "-o", "x.pt"],
                                "convert_weights.py"),
                               ("speak", ["--text", "Hi.", "--audio", "voice.wav", "--checkpoint", "tiny.pt",
                                          "--speak-checkpoint", "bomb.pt"], "speak.py")]:
        before = snapshot(work)
        code, _, err, _, mib = run_bounded([sys.executable, os.path.join(HERE, script), *map(str, args)], work)
        assert code == 2 and len(err.strip().splitlines()) == 1 and snapshot(work) == before, err
        assert name == "base" or ("torch.save never compresses them" if name == "convert" else "--upgrade") in err, err
        peaks[name] = mib
    assert max(peaks.values()) - peaks["base"] < 100, peaks          # MiB above the same run's baseline


def test_candidate_and_clip_counts_have_limits(work):
    refused(work, *rank("--candidates", clvp.MAX_CANDIDATES + 1), words=[f"--candidates must be an integer in 1..{clvp.MAX_CANDIDATES}"])
    refused(work, *rank("--audio", *["voice.wav"] * (clvp.MAX_CLIPS + 1)),
            words=[f"at most {clvp.MAX_CLIPS} clips", str(clvp.MAX_CLIPS + 1)])
    with pytest.raises(clvp.InputError, match="num_candidates"):
        clvp.check_options(clvp.DecodingOptions(num_candidates=10**6), clvp.tiny_config())


# ---------------------------------------------------------------------------------------------------
# 4. Numbers checked in the dtype and the range they are used in: a checkpoint that passes validation
# cannot break later, the sampler never sees a non-finite logit, and JSON is never NaN.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (lambda b: b["weights"].update(logit_scale=torch.tensor(100.0)), ["logit_scale 100", "ln(10^4)"]),
    (lambda b: b.update(mel_norms=torch.full((80,), 1e-40)), ["mel_norms", "at least 0.001"]),
])
def test_checkpoints_valid_only_until_used(work, change, words):
    name = crafted(work, "late.pt", change)
    refused(work, *rank("--checkpoint", name), words=["late.pt", *words])


def test_weights_that_overflow_the_logits_are_one_line_and_never_nan_json(work):
    big = lambda b: b["weights"]["decoder.head.weight"].fill_(3e38)      # noqa: E731
    name = crafted(work, "big.pt", big)
    for extra in ((), ("--json",), ("--temperature", "0")):
        refused(work, *rank("--checkpoint", name, *extra), words=["overflowed (inf or NaN)"])


def test_meta_and_sparse_tensors_through_the_api(model):
    for bad in (torch.ones(1, 3, dtype=torch.long, device="meta"), torch.ones(1, 3, dtype=torch.long).to_sparse()):
        with pytest.raises(clvp.InputError, match="text_ids must be integer ids"):
            model.text_features(bad)
    with pytest.raises(clvp.InputError, match="mels must be floats"):
        model.conditioning_latent(torch.zeros(1, 80, 10, device="meta"))
    with pytest.raises(clvp.InputError, match="wav must be floats"):
        clvp.log_mel_spectrogram(torch.zeros(5000, device="meta"))
    with pytest.raises(clvp.InputError, match="seconds must be None or a positive number"):
        clvp.load_audio(os.path.join(HERE, "examples", "voice.wav"), seconds=math.inf)


# ---------------------------------------------------------------------------------------------------
# 5. The converter checks before it indexes: numbers of a config, the kind of every key and tensor
# ---------------------------------------------------------------------------------------------------

def test_hf_config_numbers_are_checked_before_use(work, tiny_hf_dir):
    for key, value, words in [("num_attention_heads", 0, "text_config.num_attention_heads must be an integer >= 1"),
                              ("hidden_size", "64", "text_config.hidden_size must be an integer"),
                              ("vocab_size", None, "text_config.vocab_size")]:
        hf = work / f"hf-{key}"
        shutil.copytree(tiny_hf_dir, hf)
        config = json.loads((hf / "config.json").read_text())
        config["text_config"][key] = value
        (hf / "config.json").write_text(json.dumps(config))
        refused(work, "--hf", hf.name, "-o", "out.pt", script="convert_weights.py", words=["config.json", words])


def tortoise_like(work, ar_change=None, cl_change=None):
    """Two small files in Tortoise's layout, just enough for the converter to read their sizes."""
    layers = "text_transformer.transformer.attn_layers."
    ar = {"gpt.h.0.ln_1.weight": torch.ones(64), "text_embedding.weight": torch.zeros(256, 64),
          "mel_embedding.weight": torch.zeros(8194, 64), "mel_pos_embedding.emb.weight": torch.zeros(16, 64),
          "text_pos_embedding.emb.weight": torch.zeros(16, 64), "conditioning_encoder.init.weight": torch.zeros(64, 80, 1)}
    cl = {"text_emb.weight": torch.zeros(256, 64), layers + "layers.0.1.wrap.to_q.weight": torch.zeros(64, 64),
          layers + "rotary_pos_emb.inv_freq": 1 / 10000 ** (torch.arange(0, 32, 2) / 32)}
    for state, change in ((ar, ar_change), (cl, cl_change)):
        if change:
            change(state)
    torch.save(ar, work / "ar.pth")
    torch.save(cl, work / "cl.pth")
    return ["--tortoise-ar", "ar.pth", "--tortoise-clvp", "cl.pth", "-o", "out.pt"]


@pytest.mark.parametrize("ar_change, cl_change, words", [
    (lambda s: s.update({7: torch.zeros(1)}), None, ["ar.pth: not a state dict of tensors"]),
    (lambda s: s.update({"gpt.h.1.x": torch.zeros(2, device="meta")}), None, ["ar.pth: not a state dict of tensors"]),
    (lambda s: s.update({"text_embedding.weight": torch.zeros(256)}), None,
     ["text_embedding.weight must have 2 dimensions, not [256]"]),
    (lambda s: s.update({"conditioning_encoder.init.weight": torch.zeros(64, 80)}), None,
     ["conditioning_encoder.init.weight must have 3 dimensions"]),
    (None, lambda s: s.update({"text_emb.weight": torch.zeros(256)}), ["text_emb.weight must have 2 dimensions"]),
    (None, lambda s: s.update({"text_transformer.transformer.attn_layers.rotary_pos_emb.inv_freq": torch.ones(4, 4)}),
     ["inv_freq must have 1 dimensions, not [4, 4]"]),
    (None, lambda s: s.update({"text_transformer.transformer.attn_layers.rotary_pos_emb.inv_freq":
                               torch.arange(16)}), ["not the standard rotary table"]),
])
def test_the_converter_checks_before_it_indexes(work, ar_change, cl_change, words):
    refused(work, *tortoise_like(work, ar_change, cl_change), script="convert_weights.py", words=words)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_rotary_table_in_half_precision_is_the_standard_one(work, dtype):
    """The inv_freq of an fp16 or bf16 clvp2.pth is the standard table rounded to that dtype: read past it,
    the conversion stops at the next missing tensor, not at the table."""
    layers = "text_transformer.transformer.attn_layers."
    line = refused(work, *tortoise_like(work, None, lambda s: s.update({
        layers + "rotary_pos_emb.inv_freq": s[layers + "rotary_pos_emb.inv_freq"].to(dtype)})),
        script="convert_weights.py")
    assert "rotary" not in line and "layers.1.1.wrap.net.0.proj.weight is missing" in line, line


# ---------------------------------------------------------------------------------------------------
# speak.py (issue 19): every bad input as in clvp.py, through the same mechanisms. Moved here from
# test_speak.py, and grown with the classes above: FIFOs, a lying .npy header, tensors that are not
# there to read, a full disk while the WAV is written.
# ---------------------------------------------------------------------------------------------------

SPEAK = ["--random-init", "--tiny", "--candidates", 2, "--max-tokens", 12, "--diffusion-steps", 3]


def speaking(*extra, weights=False):
    """A small speak.py run in `work` (random tiny models, or tiny.pt and speak.pt with weights=True)."""
    base = ["--checkpoint", "tiny.pt", "--speak-checkpoint", "speak.pt", *SPEAK[2:]] if weights else SPEAK
    return [*base, "--text", "Hi.", "--audio", "voice.wav", "--out", "never.wav", *extra]


@pytest.mark.parametrize("args, says", [
    (["--diffusion-steps", "0"], "--diffusion-steps must be in 2..4000"),
    (["--diffusion-steps", "1"], "--diffusion-steps must be in 2..4000"),
    (["--diffusion-steps", "4001"], "--diffusion-steps must be in 2..4000"),
    (["--guidance", "-1"], "--guidance must be in 0..100"),
    (["--guidance", "nan"], "--guidance must be in 0..100"),
    (["--diffusion-temperature", "inf"], "--diffusion-temperature must be in 0..100"),
    (["--top-k", "2"], "speaks the best candidate only"),
    (["--no-pad"], "pads candidates as Tortoise does"),
    (["--sampler", "euler"], "invalid choice"),
    (["--preset", "slow"], "invalid choice"),
])
def test_speak_bad_options(work, args, says):
    refused(work, *speaking(*args), script="speak.py", words=[says])


def npy_claiming(path, shape, dtype="<i8", data=b""):
    """A .npy file whose header says `shape`, followed by `data`."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(data)


def test_speak_bad_codes(work):
    (work / "text.npy").write_text("not numpy")
    cases = [("text", None, "not a .npy array"), ("flat", np.zeros(5, dtype=np.int64), "[k, 1..500]"),
             ("long", np.zeros((1, 501), dtype=np.int64), "[k, 1..500]"), ("float", np.zeros((1, 5)), "integer tokens"),
             ("range", np.full((1, 5), 9000), "tokens must be in 0..8193")]
    for name, array, says in cases:
        if array is not None:
            np.save(work / f"{name}.npy", array)
        refused(work, *speaking("--codes", f"{name}.npy"), script="speak.py", words=[f"--codes {name}.npy", says])
    refused(work, *speaking("--codes", "absent.npy"), script="speak.py", words=["no such file"])


def test_a_npy_header_that_lies_about_its_shape(work):
    """A 1 kB file claiming [1, 10^10] int64 (75 GiB), or [10^9, 500]: refused from the header and the
    file's size, before numpy allocates by them."""
    npy_claiming(work / "huge.npy", (1, 10**10), data=bytes(800))
    refused(work, *speaking("--codes", "huge.npy"), script="speak.py", words=["[k, 1..500]", "[1, 10000000000]"])
    npy_claiming(work / "rows.npy", (10**9, 500), data=bytes(800))
    refused(work, *speaking("--codes", "rows.npy"), script="speak.py",
            words=["its header says int64 [1000000000, 500]", "holds"])
    npy_claiming(work / "object.npy", (1, 5), dtype="|O", data=bytes(40))
    refused(work, *speaking("--codes", "object.npy"), script="speak.py", words=["integer tokens"])


def test_speak_out_naming_an_input_or_a_fifo(work):
    refused(work, *speaking()[:-2], "--out", "voice.wav", script="speak.py", words=["voice.wav", "is also an input"])
    os.mkfifo(work / "fifo")
    refused(work, *speaking()[:-2], "--out", "fifo", script="speak.py", words=["not a regular file"], process=True)
    refused(work, *speaking("--codes", "fifo"), script="speak.py", words=["fifo", "not a regular file"], process=True)
    refused(work, *speaking("--speak-checkpoint", "fifo", weights=True), script="speak.py",
            words=["fifo", "not a regular file"], process=True)


def test_speak_full_disk_leaves_no_partial_wav(work):
    line = refused(work, *speaking(), script="speak.py", preexec_fn=small_files(4096), words=["never.wav"])
    assert "File too large" in line, line


@pytest.mark.parametrize("edit, says", [
    (lambda b: b.update(format="other"), "not a speak checkpoint"),
    (lambda b: b.update(version=1), "version 1"),
    (lambda b: b["diffusion"].pop("out_conv.bias"), "missing: out_conv.bias"),
    (lambda b: b["diffusion"].update({"inp_block.weight": torch.zeros(64, 100, 5)}), "inp_block.weight is [64, 100, 5]"),
    (lambda b: b["diffusion"]["time_fc1.weight"].fill_(float("nan")), "finite"),
    (lambda b: b["vocoder"].update({"conv_pre.weight_g": torch.ones(3)}), "conv_pre.weight_g must be [32, 1, 1]"),
    (lambda b: b["diffusion"].update({"latent_conv.weight": torch.zeros(64, 32, 3)}), "reads 32-wide AR latents"),
    (lambda b: b["diffusion"].update({"inp_block.weight": torch.zeros(64)}), "inp_block.weight must have 3 dimensions"),
    (lambda b: b["diffusion"].update({"layers.0.attn.relative_pos_embeddings.relative_attention_bias.weight":
                                      torch.zeros(32)}), "relative_attention_bias.weight must have 2 dimensions"),
    (lambda b: b["vocoder"].update({"conv_pre.weight_v": torch.zeros(32)}), "conv_pre.weight_v must have 2 or more"),
    (lambda b: b.update(vocoder=[1]), "vocoder: not a group of floating-point tensors"),
    (lambda b: b["diffusion"].update({"out_conv.bias": torch.zeros(100, dtype=torch.long)}),
     "diffusion: not a group of floating-point tensors"),
    (lambda b: b["vocoder"].update({"conv_pre.weight_v": torch.zeros(32, 64, 7)}), "finite"),
])
def test_bad_speak_checkpoint(work, edit, says):
    tiny_speak_file(work / "speak.pt", edit)
    refused(work, *speaking(weights=True), script="speak.py", words=["speak.pt", says])


# ---------------------------------------------------------------------------------------------------
# The fast path (issue 27): --decoder hifigan, --stream, --out -, --sample-top-k, hifigan.pt
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--stream"], "--stream needs --decoder hifigan"),
    (["--decoder", "hifigan", "--stream", "--candidates", "2"], "one candidate (--candidates 1)"),
    (["--hifigan-checkpoint", "x.pt"], "--hifigan-checkpoint needs --decoder hifigan"),
    (["--decoder", "hifigan", "--stream", "--candidates", "1", "--cache-dtype", "bfloat16"], "--stream decodes one row"),
    (["--decoder", "hifigan", "--out", "-", "--json"], "--json and --out - both write to standard output"),
    (["--decoder", "hifigan", "--out", "-", "--pcm16"], "--out - is 16-bit PCM already"),
    (["--decoder", "univnet"], "invalid choice"),
    (["--sample-top-k", "0"], "--sample-top-k must be None (off) or an integer in 1..8194"),
    (["--sample-top-k", "9000"], "--sample-top-k must be None (off) or an integer in 1..8194"),
    (["--sample-top-k", "x"], "invalid int value"),
])
def test_fast_path_bad_options(work, args, says):
    refused(work, *speaking(*args), script="speak.py", words=[says])


@pytest.mark.parametrize("stdout, says", [("closed", "--out -: standard output is closed"),
                                          ("/dev/full", "--out -: cannot write to standard output (No space left")])
def test_out_dash_with_no_standard_output_to_write(work, stdout, says):
    """--out - when fd 1 is closed, or is a full device: one line naming it, exit code 2, no traceback."""
    args = [sys.executable, os.path.join(HERE, "speak.py"), "--random-init", "--tiny", "--decoder", "hifigan",
            "--text", "Hi.", "--audio", "voice.wav", "--max-tokens", "4", "--out", "-", "--quiet"]
    with open(os.devnull if stdout == "closed" else stdout, "wb") as out:
        p = subprocess.run(args, cwd=work, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120,
                           preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None)
    lines = [line for line in p.stderr.splitlines() if not line.startswith("NOTE: --random-init")]
    assert p.returncode == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in p.stderr, p.stderr


def test_sample_top_k_is_checked_in_clvp_py_and_the_library(work):
    refused(work, "--random-init", "--tiny", "--text", "Hi.", "--audio", "voice.wav", "--sample-top-k", "-3",
            words=["--sample-top-k must be None (off) or an integer in 1..8194, not -3"])
    model = clvp.add_front_end(clvp.DecoderAndCLVP(clvp.tiny_config())).eval()
    with pytest.raises(clvp.InputError, match="sample_top_k must be"):
        model.generate(torch.tensor([5, 6]), torch.zeros(1, 80, 100), sample_top_k=2.5)


def hifigan_file(path, edit=lambda blob: None):
    """A tiny hifigan.pt for tiny.pt's decoder (64-wide latents, 32 channels), after `edit`."""
    torch.manual_seed(0)
    blob = {"format": "hifigan", "version": 1,
            "hifigan": {k: v.clone() for k, v in speak.HifiGan(64, 32).state_dict().items()}}
    edit(blob)
    clvp.write_tensor_file(path, blob)


@pytest.mark.parametrize("edit, says", [
    (lambda b: b.update(format="speak"), "not a hifigan checkpoint"),
    (lambda b: b.update(version=2), "hifigan checkpoint version 2"),
    (lambda b: b["hifigan"].pop("conv_post.bias"), "missing: conv_post.bias"),
    (lambda b: b["hifigan"].update({"conv_pre.weight": torch.zeros(32, 96, 7)}), "reads 96-wide AR latents"),
    (lambda b: b["hifigan"].update({"conv_pre.weight": torch.zeros(24, 64, 7)}), "24 channels, not a multiple of 16"),
    (lambda b: b["hifigan"].update({"conv_pre.weight": torch.zeros(32)}), "conv_pre.weight missing, or not"),
    (lambda b: b["hifigan"]["ups.0.weight"].fill_(float("inf")), "finite"),
    (lambda b: b["hifigan"].update({"resblocks.0.convs1.0.weight": torch.zeros(16, 16, 5)}),
     "resblocks.0.convs1.0.weight is [16, 16, 5], expected [16, 16, 3]"),
    (lambda b: b.update(hifigan=[1]), "hifigan: not a group of tensors"),
])
def test_bad_hifigan_checkpoint(work, edit, says):
    hifigan_file(work / "hifigan.pt", edit)
    refused(work, *speaking("--decoder", "hifigan", "--hifigan-checkpoint", "hifigan.pt", weights=True),
            script="speak.py", words=["hifigan.pt", says])


def test_hifigan_conversion_refuses_bad_sources(work):
    torch.save({"conv_pre.weight_v": torch.zeros(32, 64, 7)}, work / "partial.pth")
    refused(work, "--tortoise-hifigan", "partial.pth", "-o", "h.pt", script="convert_weights.py",
            words=["partial.pth", "conv_pre.weight_g must be [32, 1, 1]"])
    refused(work, "--tortoise-hifigan", "voice.wav", "-o", "h.pt", script="convert_weights.py", words=["voice.wav"])
    refused(work, "--tortoise-hifigan", "absent.pth", "-o", "h.pt", script="convert_weights.py", words=["absent.pth"])
    refused(work, "--tortoise-hifigan", "partial.pth", script="convert_weights.py", words=["-o PATH"])
    refused(work, "--tortoise-hifigan", "partial.pth", "-o", "partial.pth", script="convert_weights.py",
            words=["is also an input"])
    refused(work, "--fast", "--hf", "x", "-o", "x.pt", script="convert_weights.py",
            words=["--fast only applies with --download"])
    refused(work, *speaking("--decoder", "hifigan", weights=True)[4:], "--checkpoint", "tiny.pt", script="speak.py",
            env={**os.environ, "CLVP_CACHE": str(work / "empty")}, words=["no hifigan checkpoint at", "--download --fast"])


def test_speak_checkpoint_missing_or_download_options_misused(work):
    refused(work, *speaking("--speak-checkpoint", "none.pt", weights=True), script="speak.py",
            words=["none.pt: no such file"])
    refused(work, "--speak", "--hf", "x", "-o", "x.pt", script="convert_weights.py",
            words=["--speak only applies with --download"])


# ---------------------------------------------------------------------------------------------------
# Third round (issue 26). A torch whose weights_only unpickler is not safe never opens a pickle; the
# project's own files are safetensors, which no torch unpickles.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["2.5.1", "2.9.1+cpu", "1.13.0"])
def test_an_unsafe_torch_never_unpickles(work, monkeypatch, version):
    """Faked through torch.__version__ (the command lines run in this process): the converter, the one program
    that unpickles, refuses in one line naming the CVEs and the upgrade, before the file is opened (a path
    that does not exist is refused for the torch, not for being absent). clvp.py reads its checkpoint."""
    torch.save({"a": torch.zeros(1)}, work / "ar.pth")
    monkeypatch.setattr(torch, "__version__", version)
    says = ["CVE-2025-32434", "CVE-2026-24747", "pip install 'torch>=2.10'", f"torch {version}"]
    for ar in ("ar.pth", "absent.pth"):
        refused(work, "--tortoise-ar", ar, "--tortoise-clvp", "ar.pth", "-o", "x.pt", script="convert_weights.py",
                words=[ar, *says])
    torch.save({"format": "clvp", "version": 1}, work / "old.pt")
    refused(work, "--upgrade", "old.pt", script="convert_weights.py", words=["old.pt", *says])
    accepted(work, *rank("--out", "best.npy"))
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert convert_weights.load_plain(work / "ar.pth")["a"].shape == (1,)


@pytest.mark.parametrize("dtype, bits", [(torch.uint16, 16), (torch.uint32, 32), (torch.uint64, 64)])
def test_wide_unsigned_ids_are_ids(model, dtype, bits):
    """torch has no min/max for uint16..uint64 (NotImplementedError); their range is read exactly all the same."""
    ids = torch.tensor([[5, 200, 255]], dtype=dtype)
    assert torch.equal(model.text_features(ids), model.text_features(ids.long()))
    with pytest.raises(clvp.InputError, match=f"speech_ids must be ids in 0..8191, not 0..{2**bits - 1}"):
        model.speech_features(torch.tensor([[0, 2**bits - 1]], dtype=dtype))


def test_npy_files_numpy_itself_refuses(work):
    """A .npy of format 4.0 (a well-formed 2.0 file with the version byte changed), and a bool in its shape:
    one line each, not the exit code 1 of an unguarded np.load."""
    with open(work / "v4.npy", "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<i8", "fortran_order": False, "shape": (1, 5)})
        f.write(bytes(40))
    data = bytearray((work / "v4.npy").read_bytes())
    data[6] = 4
    (work / "v4.npy").write_bytes(bytes(data))
    refused(work, *speaking("--codes", "v4.npy"), script="speak.py", words=["v4.npy", "not a .npy array",
                                                                            "format version (4, 0)"])
    npy_claiming(work / "bool.npy", (True, 5), data=bytes(40))
    refused(work, *speaking("--codes", "bool.npy"), script="speak.py", words=["[k, 1..500]", "[True, 5]"])


def test_bench_runs_in_float16(tmp_path):
    """bench.py's own stop-token bias is finite in fp16 (its -1e9 was -inf there, refused as the weights' fault)."""
    code, out, err, _, _ = run_case(tmp_path, "bench.py", ["--tiny", "--candidates", 2, "--tokens", 6, "--repeat", 1,
                                                           "--dtype", "float16", "--json"])
    assert code == 0, err
    assert json.loads(out)["results"]["clvp.py float16"]["steps"] == 5          # every step ran, none stopped


def test_a_stalled_download_ends_in_one_line_and_keeps_the_part(work, hub_server, tmp_path_factory, monkeypatch):
    """convert_weights.py --download from a server that trickles (STALL made 10 kB/s over 1 s here): one line
    with the speed and how to resume, exit 2, the .part kept in the cache."""
    monkeypatch.setattr(convert_weights, "STALL", (1, 10_000))
    hub_server.files.update({n: bytes(200_000) for n in ("autoregressive.pth", "clvp2.pth", "tokenizer.json",
                                                         "mel_norms.pth")})
    hub_server.trickle.update(hub_server.files)
    cache = tmp_path_factory.mktemp("cache")
    line = refused(work, "--download", script="convert_weights.py",
                   env={"CLVP_HUB_URL": hub_server.url, "CLVP_CACHE": str(cache)},
                   words=["stalled at", "bytes/s", "run the same command again to resume"])
    [part] = cache.glob("*.part")
    assert str(part) in line and 0 < part.stat().st_size < 200_000


def test_no_inode_left_names_the_users_path(work, tiny_hf_dir, monkeypatch):
    """The temporary file cannot even be made (no free inodes, ENOSPC from mkstemp): one line naming -o's path,
    not the hidden temporary name."""
    def no_inodes(dir=None, prefix="", suffix=""):
        raise OSError(28, "No space left on device", os.path.join(dir, prefix + "x1y2" + suffix))
    monkeypatch.setattr(clvp.tempfile, "mkstemp", no_inodes)
    line = refused(work, "--hf", tiny_hf_dir, "-o", "clvp.pt", script="convert_weights.py",
                   words=["clvp.pt", "No space left on device"], also=[tiny_hf_dir])
    assert ".clvp-" not in line


# Audio that is not a number is never written: each stage's output is checked before the next reads it.
def big(group, name, value=1e38):
    return lambda blob: blob[group][name].fill_(value)


@pytest.mark.parametrize("edit, extra, stage", [
    (big("diffusion", "out_conv.weight"), [], "the diffusion's mel"),
    (big("diffusion", "out_conv.weight"), ["--pcm16"], "the diffusion's mel"),
    (big("diffusion", "unconditioned_embedding"), ["--guidance", "1"], "the diffusion's mel"),
    (big("diffusion", "inp_block.weight", 1e5), ["--dtype", "float16"], "overflowed"),
    (big("diffusion", "latent_conv.weight"), [], "the diffusion's conditioning"),
    (big("vocoder", "res_stack.0.kernel_predictor.kernel_conv.weight_g"), ["--pcm16"], "the vocoder's waveform"),
])
def test_audio_that_is_not_a_number_is_never_written(work, edit, extra, stage):
    tiny_speak_file(work / "speak.pt", edit)
    refused(work, *speaking(*extra, weights=True), script="speak.py", words=[stage, "overflowed (inf or NaN)"])


def test_codes_overflowing_only_in_the_ar_latents_are_refused(work):
    """clvp.py accepts this checkpoint (its logits stay finite); the latents speak.py reads from it do not."""
    crafted(work, "latent.pt", lambda b: b["weights"]["decoder.final_norm.weight"].fill_(3e38))
    np.save(work / "codes.npy", np.full((1, 20), 30, np.int64))
    tiny_speak_file(work / "speak.pt")
    refused(work, *speaking("--codes", "codes.npy", "--checkpoint", "latent.pt", weights=True), script="speak.py",
            words=["the AR latents overflowed"])


# ---------------------------------------------------------------------------------------------------
# Signals while a file is written: Ctrl-C, SIGTERM and SIGHUP end every program the same way.
# ---------------------------------------------------------------------------------------------------

SIGNALLED_WRITE = """
import os, signal, sys, numpy as np, soundfile, clvp
signum, how = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, even when the tests run in the background

class Signalling:                      # the signal arrives inside a write: in Python, or in libsndfile's callback
    def __init__(self, f):
        self.f = f
    def write(self, data):
        os.kill(os.getpid(), signum)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)

def write(f):
    if how == "plain":
        Signalling(f).write(b"x" * 1000)
    else:
        with soundfile.SoundFile(Signalling(f), "w", 24000, 1, "FLOAT", format="WAV") as wav:
            wav.write(np.zeros(100000, np.float32))

sys.exit(clvp.run_command("x.py", lambda: clvp.write_atomically("out.wav", write)))
"""


@pytest.mark.parametrize("how", ["plain", "libsndfile"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_inside_a_write_leaves_the_old_output_and_no_temporary_file(tmp_path, signum, how):
    (tmp_path / "out.wav").write_bytes(b"earlier")
    p = subprocess.run([sys.executable, "-c", SIGNALLED_WRITE, str(int(signum)), how], cwd=tmp_path, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": HERE}, timeout=60)
    name = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    assert p.returncode == 128 + signum and p.stderr.strip() == f"x.py: {name}; nothing half-written is left", p.stderr
    assert os.listdir(tmp_path) == ["out.wav"] and (tmp_path / "out.wav").read_bytes() == b"earlier"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_speak_py_stopped_while_writing_leaves_no_temporary_file(work, signum):
    """A real run, stopped while its WAV is open (the temporary file exists): one line, 128 + n, the earlier
    output untouched, nothing hidden left beside it."""
    (work / "lines.txt").write_text("A line to speak.\n" * 200)
    (work / "never.wav").write_bytes(b"earlier")
    args = [*SPEAK, "--text-file", "lines.txt", "--audio", "voice.wav", "--out", "never.wav"]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "speak.py"), *map(str, args)], cwd=work,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(n.startswith(".clvp-") for n in os.listdir(work)) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signum)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signum and err.strip().splitlines() == [
        f"speak.py: stopped by {signal.Signals(signum).name}; nothing half-written is left"], err
    assert not [n for n in os.listdir(work) if n.startswith(".clvp-")]
    assert (work / "never.wav").read_bytes() == b"earlier"


def test_speak_py_refuses_a_line_it_cannot_hold_with_the_figure(work, monkeypatch):
    """The audio stages' memory grows with the square of a line's frames: 500 tokens at the official size
    with guidance is about 1.5 GiB; with 1 GiB free that is refused before any work, with the figure."""
    tiny_speak_file(work / "speak.pt")
    config = speak.DiffusionConfig()
    with pytest.raises(clvp.InputError, match=r"500 speech tokens \(2176 mel frames\) needs about 1\.7 GiB .* of the "
                                              r"1\.0 GiB free: ask for fewer tokens"):
        monkeypatch.setattr(clvp, "free_memory", lambda device: 2**30)
        speak.check_speak_memory(config, 500, True, torch.float32, torch.device("cpu"))
    speak.check_speak_memory(config, 100, True, torch.float32, torch.device("cpu"))
    refused(work, *speaking("--max-tokens", 500, weights=True), script="speak.py",
            words=["500 speech tokens", "GiB free"])


def test_ulimit_v_counts_as_the_memory_there_is(work):
    """free_memory reads `ulimit -v` as well as the system's: 160 texts decoded together, 1024 candidates
    each, need about 4 GiB; under a 4 GiB limit that is refused with the limit's figure, not left to fail
    halfway through an allocation."""
    (work / "lines.txt").write_text("A line to speak.\n" * 160)
    limit = 4 * 2**30
    line = refused(work, "--text-file", "lines.txt", "--audio", "voice.wav", "--checkpoint", "tiny.pt", "--candidates",
                   1024, "--batch-size", 1024 * 160, "--max-tokens", 500, words=["GiB free"],
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert float(line.split(" GiB free")[0].split()[-1]) < 4, line
