"""Parity with the ORIGINAL Tortoise code: autoregressive.pth + clvp2.pth -> clvp.py.

tortoise_oracle.py builds Tortoise's own UnifiedVoice and CLVP (tortoise-tts 3.0.0, under the transformers 4.31.0
it pins) with random weights, saves them in the layout of the official files and records what the
original code computes. It runs in a virtual environment of its own, made here on first use
(~/.cache/clvp-test/venv-tortoise, or $CLVP_TORTOISE_VENV), because the project's environment has a
newer transformers; what it records is kept in ~/.cache/clvp-test/oracle, keyed by everything it depends on
(run_oracle). This file converts the two files with convert_weights.convert_tortoise, loads the result with
clvp.load_model and compares, in fp32 on the CPU, at a tiny size and at the official size. All of it is the
full tier (pytest --full).
"""
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import clvp
import convert_weights
from conftest import CACHE, FULL, TORTOISE_VERSION, cache_lock
from convert_weights import ConversionError

HERE = Path(__file__).resolve().parent
pytestmark = FULL           # the original code runs in a venv of its own, made on first use: the full tier

TOL = 1e-4
START, STOP = 8192, 8193

# What the original UnifiedVoice, CLVP, DiffusionTts, UnivNet and their audio utilities import, at versions
# that install from wheels (no compiler). transformers goes in with --no-deps: its tokenizers<0.14 would
# need a Rust build on newer Pythons, and these models never tokenize. librosa (its mel filterbank is part
# of the diffusion front end) goes in with --no-deps and the few packages it imports. PyPI's torchaudio is
# a CUDA build whose native libraries do not load under the CPU torch; they are deleted after installing,
# and the pure-Python rest (resample, MelSpectrogram) works. torch is the local CPU build.
VENV_PACKAGES = ["torch==2.13.0", "numpy==1.26.4", "einops==0.8.2", "rotary-embedding-torch==0.9.1",
                 "huggingface-hub==0.16.4", "safetensors==0.4.5", "regex==2026.11.19", "requests==2.34.2",
                 "packaging==26.3", "filelock==4.2.12", "pyyaml==6.0.4", "tqdm==4.70.1", "scipy==1.17.1",
                 "numba==0.68.1", "llvmlite==0.50.0", "lazy-loader==0.6", "joblib==1.6.0", "decorator==5.3.1",
                 "typing-extensions==4.16.0", "msgpack==1.2.4", "pooch==1.9.0", "platformdirs==4.14.9"]
VENV_NO_DEPS = ["transformers==4.31.0", "librosa==0.11.0", "torchaudio==2.11.1"]
TIMINGS, DIFFS = {}, {}


# ---------------------------------------------------------------------------------------------------
# The original code and its environment
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tortoise_python() -> Path:
    """The venv's python; the venv is (re)made when its record of installed pins is missing or differs."""
    with cache_lock("venv-tortoise"):
        return make_venv(Path(os.environ.get("CLVP_TORTOISE_VENV") or CACHE / "venv-tortoise"))


def make_venv(venv):
    python, record = venv / "bin" / "python", venv / "clvp-packages.txt"
    wanted = "\n".join(VENV_PACKAGES + ["--no-deps"] + VENV_NO_DEPS) + "\n"
    if record.is_file() and record.read_text() == wanted and python.exists():
        return python
    t0 = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for args in (VENV_PACKAGES, ["--no-deps"] + VENV_NO_DEPS):
        proc = subprocess.run(pip + args, capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"making {venv} failed: pip install {' '.join(args)}:\n{proc.stderr[-4000:]}")
    for native in venv.glob("lib/python*/site-packages/torchaudio/lib/*.so"):
        native.unlink()
    record.write_text(wanted)                # last: a venv cut short is made again next time
    TIMINGS["venv"] = time.perf_counter() - t0
    return python


def oracle_key(*parts):
    """What an oracle run depends on: tortoise_oracle.py, the venv's pins, this Python, the source package and the
    run's own arguments and input files' bytes (`parts`), hashed."""
    h = hashlib.sha256()
    for part in (HERE.joinpath("tortoise_oracle.py").read_bytes(), *VENV_PACKAGES, *VENV_NO_DEPS, sys.version,
                 TORTOISE_VERSION, *parts):
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def run_oracle(python, src, name, args, inputs=None):
    """The original code's outputs for `args`, run once and kept in ~/.cache/clvp-test/oracle/NAME-KEY (KEY:
    oracle_key of the arguments, an argument in `inputs` by what it maps to there: a temporary file by its
    content). A run is written to a temporary folder and renamed when complete; an older run of NAME (another
    key) is removed. The folder is only read."""
    key = oracle_key(src, *((inputs or {}).get(a, a) for a in args))
    with cache_lock(f"oracle-{name}"):
        return oracle_run(python, src, CACHE / "oracle" / f"{name}-{key}", name, args)


def oracle_run(python, src, out, name, args):
    if out.is_dir():
        TIMINGS[f"oracle {name}"] = "cached"
        return out
    for old in [*out.parent.glob(f"{name}-*"), *out.parent.glob(f".{name}-*")]:    # other keys, runs cut short
        shutil.rmtree(old, ignore_errors=True)
    part = out.parent / f".{out.name}.{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(HERE / "tortoise_oracle.py"), "--src", str(src), "--out", str(part),
                           *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        shutil.rmtree(part, ignore_errors=True)
        pytest.fail(f"tortoise_oracle.py {' '.join(map(str, args[:5]))} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    part.rename(out)
    TIMINGS[f"oracle {name}"] = time.perf_counter() - t0
    return out


def convert_and_load(directory, into):
    """The two files -> our checkpoint in `into` -> clvp.load_model; also the inferred config and skip list."""
    t0 = time.perf_counter()
    config, weights, skipped = convert_weights.convert_tortoise(directory / "autoregressive.pth",
                                                             directory / "clvp2.pth")
    checkpoint = into / "clvp.pt"
    clvp.save_checkpoint(checkpoint, config, weights)
    del weights
    model = clvp.load_model(checkpoint, "cpu")
    TIMINGS[f"convert+load {config.decoder.dim}"] = time.perf_counter() - t0
    return dict(dir=directory, checkpoint=checkpoint, model=model, config=config, skipped=skipped,
                expected=torch.load(directory / "expected.pt", weights_only=True))


@pytest.fixture(scope="session")
def tiny(tortoise_python, tortoise_src, tmp_path_factory):
    d = run_oracle(tortoise_python, tortoise_src, "tiny", ["--size", "tiny", "--seed", 0])
    return convert_and_load(d, tmp_path_factory.mktemp("tortoise-tiny"))


@pytest.fixture(scope="session")
def official(tortoise_python, tortoise_src, tmp_path_factory):
    d = run_oracle(tortoise_python, tortoise_src, "official", ["--size", "official", "--seed", 1])
    r = convert_and_load(d, tmp_path_factory.mktemp("tortoise-official"))
    yield r
    r["checkpoint"].unlink()        # 2.5 GB that the audio tests read


@pytest.fixture(scope="session", autouse=True)
def report_timings():
    yield
    if TIMINGS:
        print("\ntest_tortoise timings: " + ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.1f} s'}"
                                                     for k, v in TIMINGS.items()))
    if DIFFS:
        print("test_tortoise max |differences|: " + ", ".join(f"{k} {v:.1e}" for k, v in DIFFS.items()))


SIZES = ["tiny", "official"]


def assert_close(what, ours, theirs, tol=TOL):
    """Max absolute difference <= tol; the largest seen per `what` is printed at the end (pytest -s)."""
    diff = (ours.double() - theirs.double()).abs().max().item()
    DIFFS[what] = max(diff, DIFFS.get(what, 0.0))
    assert diff <= tol, f"{what}: max |difference| {diff:.2e} > {tol}"


def not_start(x):
    """Every column but the start token's, whose bias is -1e4 on both sides (fp32 rounding there is ~1e-3)."""
    keep = torch.ones(x.shape[-1], dtype=torch.bool)
    keep[START] = False
    return x[..., keep]


# ---------------------------------------------------------------------------------------------------
# Conversion: sizes read from shapes, tensors skipped
# ---------------------------------------------------------------------------------------------------


def test_config_read_from_shapes(tiny, official):
    small = dict(layers=2, rotary_dim=32, projection_dim=96)
    assert tiny["config"] == clvp.Config(
        clvp.DecoderConfig(dim=128, layers=2, heads=2),
        clvp.EncoderConfig(vocab_size=256, dim=64, heads=1, ff_dim=128, **small),
        clvp.EncoderConfig(vocab_size=8192, dim=128, heads=2, ff_dim=256, **small))
    assert official["config"] == clvp.Config()


@pytest.mark.parametrize("size", SIZES)
def test_skipped_tensors(size, request):
    r = request.getfixturevalue(size)
    layers = r["config"].decoder.layers
    assert sorted(r["skipped"]) == sorted(
        [f"gpt.h.{i}.attn.{b}" for i in range(layers) for b in ("bias", "masked_bias")]
        + ["text_head.weight", "text_head.bias"]
        + [f"{s}_transformer.transformer.attn_layers.rotary_pos_emb.inv_freq" for s in ("text", "speech")])


def test_inference_copies_are_skipped(tiny, tmp_path):
    """A state dict saved after post_init_gpt2_config also holds the decoder again (inference_model.*)
    and gpt.wte; they are left out and change nothing."""
    state = torch.load(tiny["dir"] / "autoregressive.pth", weights_only=True)
    state["gpt.wte.weight"] = state["mel_embedding.weight"]
    state.update({"inference_model.transformer." + k[4:]: v for k, v in list(state.items())
                  if k.startswith("gpt.h.")})
    torch.save(state, tmp_path / "ar.pth")
    _, weights, skipped = convert_weights.convert_tortoise(tmp_path / "ar.pth", tiny["dir"] / "clvp2.pth")
    assert "gpt.wte.weight" in skipped and "inference_model.transformer.h.0.ln_1.weight" in skipped
    for name, t in tiny["model"].state_dict().items():
        assert torch.equal(weights[name], t), name


def test_legacy_qkv_reordering():
    """Output channel h * 3 * hd + j * hd + c of the per-head layout is j * D + h * hd + c in ours."""
    heads, hd = 3, 2
    per_head = torch.arange(heads * 3 * hd)
    stacked = convert_weights.per_head_to_stacked(per_head, heads)
    for h in range(heads):
        for j in range(3):
            for c in range(hd):
                assert stacked[j * heads * hd + h * hd + c] == h * 3 * hd + j * hd + c


# ---------------------------------------------------------------------------------------------------
# Numbers against the original code
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_conditioning_latent(size, request):
    r = request.getfixturevalue(size)
    e = r["expected"]
    with torch.no_grad():
        ours = r["model"].voice_latent(e["mels"][0])        # [clips, 80, frames] -> mean of the clip latents
    assert_close(f"{size} conditioning latent", ours, e["cond_latent"][0])


@pytest.mark.parametrize("size", SIZES)
def test_decoder_logits_match_original_generate(size, request):
    """The original's per-step greedy scores (raw logits: no processor runs at repetition_penalty 1.0) are
    our teacher-forced logits with the k-th generated token at speech position k + 1."""
    r = request.getfixturevalue(size)
    e = r["expected"]
    tokens, scores = e["greedy_tokens"], e["greedy_scores"]
    assert tokens.shape[1] == e["stop_at"] + 1 and tokens[0, -1] == STOP     # the oracle's stop, halfway
    with torch.no_grad():
        logits = r["model"].speech_logits(e["mels"][0], e["text_ids"], tokens)[:, :tokens.shape[1]]
    assert_close(f"{size} greedy logits", not_start(logits), not_start(scores))
    assert torch.equal(logits.argmax(-1), tokens)


@pytest.mark.parametrize("size", SIZES)
def test_greedy_generate_matches_original(size, request):
    r = request.getfixturevalue(size)
    e = r["expected"]
    gen = r["model"].generate(e["text_ids"][0], e["mels"][0], num_candidates=1, temperature=0,
                              repetition_penalty=1.0, max_new_tokens=e["steps"], pad_to_max=False)
    fixed, length = clvp.fix_candidates(e["greedy_tokens"], STOP)
    assert torch.equal(gen.candidates, fixed) and torch.equal(gen.lengths, length)


@pytest.mark.parametrize("size", SIZES)
def test_repetition_penalty_reaches_fake_prompt(size, request):
    """Quirk: the original prompts generate() with a run of token 1 ending in the start token, so its
    repetition penalty also hits speech token 1. clvp.py penalizes the start token and the generated
    tokens only: the same scores except in column 1."""
    r = request.getfixturevalue(size)
    e = r["expected"]
    tokens, scores = e["penalized_tokens"], e["penalized_scores"]
    assert set(e["fake_prompt"][0, :-1].tolist()) == {1} and e["fake_prompt"][0, -1] == START
    with torch.no_grad():
        raw = r["model"].speech_logits(e["mels"][0], e["text_ids"], tokens)[0, :tokens.shape[1]]
    for k in range(tokens.shape[1]):
        seen = torch.zeros(raw.shape[-1], dtype=torch.bool)
        seen[[START, *tokens[0, :k].tolist()]] = True
        ours = clvp.repetition_penalty(raw[k:k + 1], seen, 2.0)
        seen[1] = True
        original = clvp.repetition_penalty(raw[k:k + 1], seen, 2.0)
        assert_close(f"{size} penalized scores", not_start(original), not_start(scores[:, k]))
        keep = torch.ones(raw.shape[-1], dtype=torch.bool)
        keep[[1, START]] = False
        assert_close(f"{size} penalized scores", ours[:, keep], scores[:, k, keep])
        if tokens[0, :k].ne(1).all():
            assert abs(ours[0, 1] - scores[0, k, 1]) > 1e-3    # token 1: penalized there, not here
    gen = r["model"].generate(e["text_ids"][0], e["mels"][0], num_candidates=1, temperature=0,
                              repetition_penalty=2.0, max_new_tokens=e["steps"], pad_to_max=False)
    assert torch.equal(gen.candidates, clvp.fix_candidates(tokens, STOP)[0])   # token 1 never mattered here


@pytest.mark.parametrize("size", SIZES)
def test_clvp_similarity_and_loss(size, request):
    """CLVP.forward(text + [0] repeated, speech, return_loss=False) is the diagonal of our similarity
    matrix for one text; return_loss=True is our contrastive_loss."""
    r = request.getfixturevalue(size)
    e, model = r["expected"], r["model"]
    with torch.no_grad():
        similarity = model.similarity(e["text_ids"], e["speech_rows"])[0]
        loss = model.contrastive_loss(e["loss_texts"], e["speech_rows"])
    assert_close(f"{size} CLVP similarity", similarity, e["clvp_sim"])
    assert_close(f"{size} CLVP loss", loss, e["clvp_loss"])


@pytest.mark.parametrize("size", SIZES)
def test_rerank_like_api(size, request):
    """api.py's path with greedy decoding: stop-pad to max_mel_tokens, fix_autoregressive_output, score;
    and the fix on rows that stop at the start, halfway, in the last three tokens, and never."""
    r = request.getfixturevalue(size)
    e, model = r["expected"], r["model"]
    gen = model.generate(e["text_ids"][0], e["mels"][0], num_candidates=1, temperature=0,
                         repetition_penalty=1.0, max_new_tokens=e["steps"], pad_to_max=True)
    assert torch.equal(gen.candidates, e["ranked_codes"])
    assert_close(f"{size} rerank score", gen.scores, e["ranked_scores"])
    assert torch.equal(clvp.fix_candidates(e["fix_rows"], STOP)[0], e["fixed_rows"])
    with torch.no_grad():
        scores = model.similarity(e["text_ids"], e["fixed_rows"])[0]
    assert_close(f"{size} fixed-row scores", scores, e["fixed_scores"])


# ---------------------------------------------------------------------------------------------------
# Bad inputs: one clear line each
# ---------------------------------------------------------------------------------------------------


def conversion_error(ar, cl):
    with pytest.raises(ConversionError) as info:
        convert_weights.convert_tortoise(ar, cl)
    message = str(info.value)
    assert "\n" not in message
    return message


def saved(tmp_path, name, obj):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_files_swapped(tiny):
    ar, cl = tiny["dir"] / "autoregressive.pth", tiny["dir"] / "clvp2.pth"
    assert "the other way round" in conversion_error(cl, ar)
    assert "this is autoregressive.pth (the decoder), given as clvp2.pth" in conversion_error(ar, ar)
    assert "this is clvp2.pth (the CLVP encoders), given as autoregressive.pth" in conversion_error(cl, cl)


def test_unreadable_files(tiny, tmp_path):
    ar, cl = tiny["dir"] / "autoregressive.pth", tiny["dir"] / "clvp2.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ar.read_bytes()[: ar.stat().st_size // 2])
    assert conversion_error(truncated, cl).startswith(f"{truncated}: cannot be read as plain tensors")
    module = saved(tmp_path, "module.pth", torch.nn.Linear(2, 2))
    message = conversion_error(ar, module)
    assert message.startswith(f"{module}: cannot be read as plain tensors") and "unpickle code" in message
    listed = saved(tmp_path, "list.pth", [torch.zeros(1)])
    assert conversion_error(listed, cl) == f"{listed}: not a state dict of tensors"
    assert "no such file" in conversion_error(tmp_path / "absent.pth", cl).lower()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_copies_convert(tiny, tmp_path, dtype):
    """An fp16 or bf16 copy of the two files is valid: its rotary tables are the standard ones rounded to
    that dtype, and the conversion gives the fp32 original's config and its weights rounded the same way."""
    paths = []
    for name in ("autoregressive.pth", "clvp2.pth"):
        state = torch.load(tiny["dir"] / name, weights_only=True)
        paths.append(saved(tmp_path, name, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}))
    config, weights, _ = convert_weights.convert_tortoise(*paths)
    assert config == tiny["config"]
    for name, t in tiny["model"].state_dict().items():
        assert weights[name].dtype == dtype and torch.equal(weights[name], t.to(dtype)), name


def test_not_tortoise_files(tiny, tmp_path):
    ar, cl = tiny["dir"] / "autoregressive.pth", tiny["dir"] / "clvp2.pth"
    hf = saved(tmp_path, "hf.pth", {"speech_decoder_model.lm_head.weight": torch.zeros(2, 2)})
    assert "a transformers CLVP checkpoint" in conversion_error(hf, cl) and "--hf" in conversion_error(hf, cl)
    other = saved(tmp_path, "other.pth", {"encoder.weight": torch.zeros(2)})
    assert "not Tortoise's clvp2.pth" in conversion_error(ar, other)


def edited(tmp_path, source, edit):
    state = torch.load(source, weights_only=True)
    edit(state)
    return saved(tmp_path, "edited-" + source.name, state)


def test_missing_unexpected_and_misfit_tensors(tiny, tmp_path):
    ar, cl = tiny["dir"] / "autoregressive.pth", tiny["dir"] / "clvp2.pth"
    gone = edited(tmp_path, ar, lambda s: s.pop("gpt.h.1.ln_2.bias"))
    assert conversion_error(gone, cl) == f"{gone}: 1 tensor(s) missing: gpt.h.1.ln_2.bias"
    extra = edited(tmp_path, cl, lambda s: s.update({"speech_transformer.extra": torch.zeros(1)}))
    assert conversion_error(ar, extra) == f"{extra}: 1 unexpected tensor(s): speech_transformer.extra"
    # One layer of another width: named, with the size the rest of the file gives and the official one.
    wide = edited(tmp_path, ar, lambda s: s.update({"gpt.h.1.mlp.c_fc.weight": torch.zeros(128, 1024)}))
    message = conversion_error(wide, cl)
    assert "gpt.h.1.mlp.c_fc.weight is [128, 1024], expected [128, 512]" in message
    assert "decoder 2 layers x 128 wide" in message and "official size: decoder 30 layers x 1024 wide" in message
    narrow = edited(tmp_path, cl, lambda s: s.update({
        "speech_transformer.transformer.attn_layers.layers.2.1.wrap.to_k.weight": torch.zeros(64, 128)}))
    assert "layers.2.1.wrap.to_k.weight is [64, 128], expected [128, 128]" in conversion_error(ar, narrow)


def test_sizes_clvp_cannot_hold(tiny, tmp_path):
    ar, cl = tiny["dir"] / "autoregressive.pth", tiny["dir"] / "clvp2.pth"
    # x-transformers attention heads x 64 wide in an encoder of another width (e.g. dim 128, 1 head).
    q = "text_transformer.transformer.attn_layers.layers.0.1.wrap.to_q.weight"
    odd = edited(tmp_path, cl, lambda s: s.update({q: torch.zeros(128, 64)}))
    assert "text attention is 128 wide (heads x 64) in a 64-wide encoder" in conversion_error(ar, odd)
    freq = "speech_transformer.transformer.attn_layers.rotary_pos_emb.inv_freq"
    base = edited(tmp_path, cl, lambda s: s.update({freq: s[freq] * 2}))
    assert "not the standard rotary table" in conversion_error(ar, base)
    few = edited(tmp_path, cl, lambda s: s.update({"speech_emb.weight": s["speech_emb.weight"][:1024]}))
    assert "the speech encoder reads 1024 codes" in conversion_error(ar, few)


# ---------------------------------------------------------------------------------------------------
# The command line, the Hugging Face path, and fetching the official files
# ---------------------------------------------------------------------------------------------------


def test_cli_converts_and_lists_skipped(tiny, tmp_path):
    out = tmp_path / "clvp.pt"
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), "--tortoise-ar",
                           str(tiny["dir"] / "autoregressive.pth"), "--tortoise-clvp", str(tiny["dir"] / "clvp2.pth"),
                           "-o", str(out), "--verbose"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped text_head.weight" in proc.stdout and "skipped gpt.h.0.attn.bias" in proc.stdout
    model = clvp.load_model(out, "cpu")
    assert model.tokenizer.encode("Hello world") == [62, 84, 28, 2, 179, 79]     # the shipped tokenizer
    assert model.mel_norms.shape == (80,)
    for k, v in tiny["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_hf_and_tortoise_paths_give_identical_tensors(tiny, tmp_path):
    """The same weights, once in the transformers layout and once in Tortoise's, convert to the same bytes."""
    ref = bench.reference_model(tiny["model"])          # transformers' CLVP holding exactly these weights
    ref.save_pretrained(tmp_path)
    _, weights, _, _ = convert_weights.convert_hf(str(tmp_path))
    _, tortoise_weights, _ = convert_weights.convert_tortoise(tiny["dir"] / "autoregressive.pth",
                                                              tiny["dir"] / "clvp2.pth")
    assert weights.keys() == tortoise_weights.keys()
    for k in weights:
        assert weights[k].dtype == tortoise_weights[k].dtype and torch.equal(weights[k], tortoise_weights[k]), k


def test_download_and_convert_against_a_local_hub(tiny, hub_server, tmp_path, tortoise_src):
    for name in ("autoregressive.pth", "clvp2.pth"):
        hub_server.files[name] = (tiny["dir"] / name).read_bytes()
    for name in ("tokenizer.json", "mel_norms.pth"):                # the official files, as Tortoise ships them
        hub_server.files[name] = (tortoise_src / "tortoise" / "data" / name).read_bytes()
    hub_server.drop_once.add("autoregressive.pth")                 # a dropped connection mid-file
    cache = tmp_path / "cache"
    proc_env = {**os.environ, "CLVP_HUB_URL": hub_server.url, "CLVP_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), "--download"], capture_output=True,
                          text=True, env=proc_env)
    assert proc.returncode == 0, proc.stderr
    assert ("autoregressive.pth", f"bytes={len(hub_server.files['autoregressive.pth']) // 2}-") in hub_server.requests
    assert sorted(p.name for p in cache.iterdir()) == ["autoregressive.pth", "clvp.pt", "clvp2.pth", "mel_norms.pth",
                                                       "tokenizer.json"]
    model = clvp.load_model(cache / "clvp.pt", "cpu")
    for k, v in tiny["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # The command line finds it there on its own.
    run = subprocess.run([sys.executable, str(HERE / "clvp.py"), "--text", "Hi.", "--audio",
                          str(HERE / "examples" / "voice.wav"), "--candidates", "2", "--max-tokens", "8", "--out",
                          str(tmp_path / "b.npy")], capture_output=True, text=True, env=proc_env)
    assert run.returncode == 0, run.stderr
    # A 404 is one clear line, and nothing is left behind.
    del hub_server.files["clvp2.pth"]
    empty = tmp_path / "empty"
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), "--download", "--cache", str(empty)],
                          capture_output=True, text=True, env=proc_env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "404" in proc.stderr
    assert "clvp2.pth" in proc.stderr and not list(empty.glob("clvp*"))


def test_full_disk_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    import errno

    class Full:                                        # a disk that fills after the header's first bytes
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += memoryview(data).nbytes
            if self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    recording = clvp.RecordingFile
    monkeypatch.setattr(clvp, "RecordingFile", lambda f: recording(Full(f)))
    out = tmp_path / "out" / "clvp.pt"
    out.parent.mkdir()
    code = convert_weights.main(["--tortoise-ar", str(tiny["dir"] / "autoregressive.pth"),
                                 "--tortoise-clvp", str(tiny["dir"] / "clvp2.pth"), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert list(out.parent.iterdir()) == []
    code = convert_weights.main(["--tortoise-ar", str(tiny["dir"] / "autoregressive.pth"),
                                 "--tortoise-clvp", str(tiny["dir"] / "clvp2.pth"), "-o", str(tmp_path / "no" / "x.pt")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The audio stages (speak.py) against the original DiffusionTts, sampler and UnivNet, at the official size
# ---------------------------------------------------------------------------------------------------

import numpy as np          # noqa: E402  (the audio section's own imports)
import soundfile            # noqa: E402

import speak                # noqa: E402

CHAIN_TEXT = "Hello there, how are you today?"
CHAINS = {"unguided": (30, 0.0, 1.0), "guided": (24, 2.0, 0.8)}     # steps, guidance k, diffusion temperature
WAV_TOL = 1e-2              # a whole chain on random weights amplifies rounding; see the figures


def voice_clips(d):
    """Two reference clips under 6 s, so the original's random 6 s cut never runs."""
    wav, sr = soundfile.read(HERE / "examples" / "voice.wav", dtype="float32")
    voices = [d / "v1.wav", d / "v2.wav"]
    soundfile.write(voices[0], wav[:5 * sr], sr, subtype="FLOAT")
    soundfile.write(voices[1], 0.5 * wav[::-1][:4 * sr], sr, subtype="FLOAT")
    return voices


def voiced_oracle(python, src, official, d, mode):
    """tortoise_oracle.py --audio or --fast, on two clips made in d, CHAIN_TEXT's ids and the `official` run's
    decoder -> (the clips, the oracle's folder)."""
    voices = voice_clips(d)
    ids = clvp.Tokenizer.from_file(HERE / "data" / "tokenizer.json").encode(CHAIN_TEXT)
    return voices, run_oracle(python, src, mode, ["--size", "official", "--seed", 3, f"--{mode}", "--ar", official["dir"],
                                                  "--voice", *voices, "--text-ids", ",".join(map(str, ids))],
                              # by their samples: libsndfile stamps the time into a float WAV's PEAK chunk
                              inputs={v: soundfile.read(v, dtype="float32")[0].tobytes() for v in voices})


@pytest.fixture(scope="session")
def audio(tortoise_python, tortoise_src, official, tmp_path_factory):
    """One oracle run: the original's audio pieces and two chains from codes to a WAV, on random official-size
    DiffusionTts and UnivNet and the official-size decoder of the `official` run; then speak.pt converted."""
    d = tmp_path_factory.mktemp("tortoise-audio")
    voices, o = voiced_oracle(tortoise_python, tortoise_src, official, d, "audio")
    t0 = time.perf_counter()
    _, skipped = convert_weights.convert_tortoise_audio(o / "diffusion_decoder.pth", o / "vocoder.pth")
    assert convert_weights.main(["--tortoise-diffusion", str(o / "diffusion_decoder.pth"), "--tortoise-vocoder",
                                 str(o / "vocoder.pth"), "-o", str(d / "speak.pt")]) == 0
    diffusion, vocoder = speak.load_speak(d / "speak.pt", "cpu", 1024)
    TIMINGS["convert+load speak.pt"] = time.perf_counter() - t0
    yield dict(dir=d, voices=voices, diffusion=diffusion, vocoder=vocoder, skipped=skipped,
               expected=torch.load(o / "expected_audio.pt", weights_only=True), ar=official)
    (d / "speak.pt").unlink()


def test_audio_skipped_and_sizes(audio):
    assert speak.diffusion_config(audio["diffusion"].state_dict()) == speak.DiffusionConfig()
    assert {k.split(".")[0] for k in audio["skipped"]} == {"code_embedding", "code_converter", "mel_head"}


def test_resample_and_univnet_mel(audio):
    e = audio["expected"]
    wav = clvp.load_audio(audio["voices"][0])                       # 22.05 kHz, as the original loads it
    ours = speak.resample(wav)
    assert ours.shape == e["resampled"].shape
    assert_close("resample 22.05 -> 24 kHz", ours, e["resampled"])
    mel = speak.diffusion_voice_mels(audio["voices"][:1], "cpu")
    assert mel.shape == (1, 100, 401)
    assert_close("univnet log-mel", mel, e["voice_mel"])


def test_voice_latents(audio):
    e, model = audio["expected"], audio["ar"]["model"]
    norms = clvp.read_mel_norms(clvp.SHIPPED[1])
    mels = torch.stack([clvp.log_mel_spectrogram(clvp.format_conditioning(clvp.load_audio(p)), norms) for p in audio["voices"]])
    with torch.no_grad():
        voice = audio["diffusion"].diffusion_latent(speak.diffusion_voice_mels(audio["voices"], "cpu"))
        auto = model.voice_latent(mels)
    assert voice.shape == (1, 2048)
    assert_close("diffusion voice latent", voice, e["voice_latent"])
    assert_close("AR voice latent (Tortoise's torchaudio mel)", auto, e["auto_latent"][0])


def test_timestep_independent(audio):
    e = audio["expected"]
    with torch.no_grad():
        ours = audio["diffusion"].timestep_independent(e["piece_latents"], e["voice_latent"], e["x"].shape[-1])
    assert_close("timestep_independent", ours, e["conditioning"])


@pytest.mark.parametrize("t", [0, 1000, 3999])
def test_network_forward(audio, t):
    e, model = audio["expected"], audio["diffusion"]
    free = model.unconditioned_embedding.expand(1, -1, e["x"].shape[-1])
    with torch.no_grad():
        ours = model(e["x"], torch.tensor([t]), e["conditioning"])
        ours_free = model(e["x"], torch.tensor([t]), free)
        both = model(e["x"].expand(2, -1, -1), torch.tensor([t, t]), torch.cat([e["conditioning"], free]))
    assert_close("network forward", ours, e[f"forward {t}"])
    assert_close("network forward, conditioning-free", ours_free, e[f"forward {t} free"])
    assert_close("network forward, the guided pair batched", both, torch.cat([e[f"forward {t}"], e[f"forward {t} free"]]))


@pytest.mark.parametrize("name", ["unguided", "guided"])
def test_sampler_steps(audio, name):
    """Given the same x_t and network outputs: the respaced timesteps, each step's mean, log-variance and
    x0 (p_mean_variance), and DDIM's step (ddim_sample at eta 0)."""
    e = audio["expected"]
    steps, k, _ = CHAINS[name]
    s = speak.Schedule(steps)
    x, eps_c, eps_u, var = (e[f"{name} {key}"] for key in ("x", "eps", "eps_free", "var"))
    done = [steps - 1, steps // 2, 0]
    # each step's fake network is called by p_mean_variance and again by ddim_sample, twice each when guided
    expected_t = [int(s.timesteps[i]) for i in done for _ in range(4 if k else 2)]
    assert e[f"{name} timesteps"].tolist() == expected_t
    for i in done:
        weight = k * (1 - i / steps)
        eps = (1 + weight) * eps_c - weight * eps_u if k else eps_c
        _, mean, log_variance, x0 = speak.ddpm_step(s, i, x, eps, var, torch.zeros_like(x))
        inside = (x0.abs() < 1).float().mean().item()     # the noisiest step clamps ~99.6% of x0, as the original does
        assert inside > (0 if i == steps - 1 else 0.01), f"x0 clamped everywhere at step {i}: the comparison would mean little"
        assert_close(f"{name} step mean", mean, e[f"{name} {i} mean"])
        assert_close(f"{name} step log-variance", log_variance, e[f"{name} {i} log_variance"])
        assert_close(f"{name} step x0", x0, e[f"{name} {i} pred_xstart"])
        assert_close(f"{name} DDIM step", speak.ddim_step(s, i, x, eps, var, None)[0], e[f"{name} {i} ddim"])


def test_univnet_with_explicit_z(audio):
    e = audio["expected"]
    with torch.no_grad():
        ours = audio["vocoder"].inference(e["vocoder_mel"], e["vocoder_z"])
    assert ours.shape == e["vocoder_wav"].shape == (1, 1, 256 * 40)
    assert 0.01 < (ours.abs() < 1).float().mean().item()           # not all clamped
    assert_close("UnivNet, weight norm folded", ours, e["vocoder_wav"])


def test_ar_latents_and_trim(audio):
    e, model = audio["expected"], audio["ar"]["model"]
    with torch.no_grad():
        ours = speak.speech_latents(model, e["auto_latent"], e["text_ids"], e["codes"])
    assert ours.shape == e["ar_latents"].shape == (2, 500, 1024)
    assert_close("AR latents (training positions)", ours, e["ar_latents"])
    assert [speak.calm_length(c) for c in e["codes"]] == e["kept"].tolist() == [48, 500]


@pytest.mark.parametrize("name", ["unguided", "guided"])
def test_chain_through_command_line(audio, name, tmp_path, capsys):
    """speak.py --codes with a seed against the original's manual_seed + do_spectrogram_diffusion +
    vocoder.inference, from the same converted files."""
    e = audio["expected"]
    steps, k, temperature = CHAINS[name]
    np.save(tmp_path / "codes.npy", e["codes"][:1].numpy())
    out = tmp_path / "speech.wav"
    code = speak.main(["--text", CHAIN_TEXT, "--audio", *map(str, audio["voices"]), "--codes", str(tmp_path / "codes.npy"),
                       "--checkpoint", str(audio["ar"]["checkpoint"]), "--speak-checkpoint", str(audio["dir"] / "speak.pt"),
                       "--seed", str(e["seed"]), "--diffusion-steps", str(steps), "--guidance", str(k),
                       "--diffusion-temperature", str(temperature), "--device", "cpu", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    ours, sr = soundfile.read(out, dtype="float32")
    theirs = e[f"{name} wav"]
    assert sr == 24000 and ours.shape == theirs.shape == (256 * (48 * 4 * 24000 // 22050),)
    diff = float(np.abs(ours - theirs.numpy()).max())
    DIFFS[f"{name} chain WAV"] = diff
    assert diff <= WAV_TOL, f"{name}: WAV max |difference| {diff:.2e} > {WAV_TOL}"
    assert float(np.abs(theirs.numpy()).max()) > 0.05               # not silence on both sides


# ---------------------------------------------------------------------------------------------------
# The text splitter of read.py and read_fast.py: clvp.split_text against the original
# tortoise/utils/text.py: split_and_recombine_text, which imports only re
# ---------------------------------------------------------------------------------------------------

SHIPPED_TEXTS = ["riding_hood.txt", "seal_copypasta.txt", "got.txt", "layman.txt"]
SPLIT_PIECES = [".", "!", "?", '"', "\u201c", "\u201d", " ", " ", "  ", "\n", "\n\n", "\t", ",", ";", "...", "?!",
                "a", "b", "The", "word", "said", "x" * 40, "W" * 350]


@pytest.fixture(scope="module")
def original_split(tortoise_src):
    import importlib.util
    spec = importlib.util.spec_from_file_location("tortoise_text", tortoise_src / "tortoise" / "utils" / "text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.split_and_recombine_text


def test_split_text_equals_the_original_on_tortoises_texts(tortoise_src, original_split):
    compared = 0
    for name in SHIPPED_TEXTS:
        text = (tortoise_src / "tortoise" / "data" / name).read_text(encoding="utf-8")
        for piece in [text] + text.splitlines():
            expected = original_split(piece)
            assert clvp.split_text(piece) == expected, (name, piece[:80])
            compared += 1
        assert len(original_split(text)) > 3 or name == "layman.txt"    # the sdist's layman.txt is empty
    assert compared > 100


def random_text(rng):
    """Up to a few thousand characters, mostly the splitter's special characters, with words and runs of
    letters longer than its lengths, each piece drawn with a weight of its own so that texts differ in kind."""
    weights = [rng.random() ** 3 for _ in SPLIT_PIECES]
    return "".join(rng.choices(SPLIT_PIECES, weights, k=rng.choice([0, 1, 2, 5, 20, 80, 300, 1000])))


def test_split_text_equals_the_original_on_random_texts(original_split):
    import random
    rng = random.Random(20240607)
    kinds = set()
    for i in range(3000):
        text = random_text(rng)
        desired, longest = (200, 300) if i % 2 else (rng.randint(1, 250), rng.randint(1, 350))
        expected = original_split(text, desired, longest)
        assert clvp.split_text(text, desired, longest) == expected, (i, desired, longest, text[:200])
        kinds.add(min(len(expected), 3))
    assert kinds == {0, 1, 2, 3}                   # texts that give no part, one, two and many


# ---------------------------------------------------------------------------------------------------
# The fast path (api_fast.py): HiFi-GAN per call, tts() for given codes, tts_stream()'s chunks
# ---------------------------------------------------------------------------------------------------

FAST_WAV_TOL = 1e-3         # tts() through the 30-layer decoder and HiFi-GAN, fp32 (the bound)
PCM_LSB = 1 / 32767


@pytest.fixture(scope="session")
def fast(tortoise_python, tortoise_src, official, tmp_path_factory):
    """One oracle run of api_fast.py on a random official-size HiFi-GAN and the `official` decoder; hifigan.pt
    converted from its hifidecoder.pth through the command line."""
    d = tmp_path_factory.mktemp("tortoise-fast")
    voices, o = voiced_oracle(tortoise_python, tortoise_src, official, d, "fast")
    t0 = time.perf_counter()
    assert convert_weights.main(["--tortoise-hifigan", str(o / "hifidecoder.pth"), "-o", str(d / "hifigan.pt")]) == 0
    hifigan = speak.load_hifigan(d / "hifigan.pt", "cpu", 1024)
    TIMINGS["convert+load hifigan.pt"] = time.perf_counter() - t0
    return dict(dir=d, voices=voices, hifigan=hifigan, expected=torch.load(o / "expected_fast.pt", weights_only=True),
                ar=official)


def fast_command(fast, codes, *args):
    e, d = fast["expected"], fast["dir"]
    np.save(d / "codes.npy", e[codes].numpy())
    return [sys.executable, str(HERE / "speak.py"), "--text", CHAIN_TEXT, "--audio", *map(str, fast["voices"]),
            "--codes", str(d / "codes.npy"), "--checkpoint", str(fast["ar"]["checkpoint"]), "--decoder", "hifigan",
            "--hifigan-checkpoint", str(d / "hifigan.pt"), "--device", "cpu", "--quiet", *args]


def test_hifigan_per_call(fast):
    e = fast["expected"]
    assert e["call_wav"].abs().max() > 0.01                    # random weights, yet not a silent output
    with torch.no_grad():
        ours = speak.hifigan_decode(fast["hifigan"], e["call_latents"], e["auto_latent"])
    assert ours.shape == e["call_wav"][0, 0].shape == (256 * int(int(4 * 37) * 24000 / 22050),)
    assert_close("HiFi-GAN per call, weight norm folded", ours, e["call_wav"][0, 0])


def test_hifigan_tts_through_command_line(fast, tmp_path):
    """speak.py --codes --decoder hifigan: api_fast's tts() for those codes (its inference_speech stood in by them)."""
    r = subprocess.run(fast_command(fast, "tts_codes", "--out", str(tmp_path / "fast.wav")), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ours, sr = soundfile.read(tmp_path / "fast.wav", dtype="float32")
    theirs = fast["expected"]["tts_wav"][0, 0]
    assert sr == 24000 and ours.shape == theirs.shape
    assert_close("api_fast tts() WAV", torch.from_numpy(ours), theirs, FAST_WAV_TOL)


def test_stream_through_command_line(fast):
    """speak.py --codes --stream --out -: the original's tts_stream chunks (its generator forced to the codes,
    handle_chunks over what it decoded), then the 1024 samples the original holds back and never plays, within
    2 LSB."""
    r = subprocess.run(fast_command(fast, "stream_codes", "--stream", "--out", "-"), capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    e = fast["expected"]
    ours, theirs = np.frombuffer(r.stdout, dtype="<i2").astype(np.float64), e["stream_chunks"].double().numpy()
    assert e["stream_chunk_lengths"].tolist() == [65792, 44544, 34560]     # decodes at 60, 100 and 131 latents
    assert len(ours) == len(theirs) + speak.STREAM_OVERLAP
    theirs = np.concatenate([theirs, e["stream_tail"].double().numpy()])   # the held-back end, which we play
    lsb = np.abs(ours - np.round(theirs * 32767)).max()
    DIFFS["tts_stream chunks and tail, LSB of 16-bit PCM"] = lsb
    assert lsb <= 2
