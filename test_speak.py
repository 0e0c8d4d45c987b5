"""Tests of speak.py: the command line on random weights, bad input, and the audio stages' own consistency.
Parity with the original Tortoise code is in test_tortoise.py."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

import clvp
import convert_weights
import speak
from conftest import original_speak_names, tiny_speak_file

HERE = Path(__file__).resolve().parent
VOICE = HERE / "examples" / "voice.wav"
FAST = ["--random-init", "--tiny", "--candidates", "2", "--max-tokens", "12", "--diffusion-steps", "3", "--quiet"]


def cli(*args):
    return subprocess.run([sys.executable, str(HERE / "speak.py"), *map(str, args)], capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------


def test_random_init_tiny_writes_a_24khz_wav(tmp_path):
    out = tmp_path / "hello.wav"
    proc = cli("--random-init", "--tiny", "--text", "Hello there.", "--audio", VOICE, "--out", out, "--seed", "0",
               "--max-tokens", "40", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "meaningless" in proc.stdout or "noise" in proc.stdout
    info = soundfile.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "FLOAT")
    wav, _ = soundfile.read(out, dtype="float32")
    assert len(wav) % 256 == 0 and len(wav) > 0 and np.isfinite(wav).all() and np.abs(wav).max() <= 1


def test_json_pcm16_and_seeded_repeats(tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    for out in (a, b):
        proc = cli(*FAST, "--text", "Hi.", "--audio", VOICE, "--out", out, "--seed", "7", "--json", "--pcm16")
        assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["sample_rate"] == 24000 and report["out"] == str(b)
    assert set(report["stages"]) == {"decoding", "latents", "diffusion", "vocoder"}
    assert soundfile.info(a).subtype == "PCM_16"
    assert a.read_bytes() == b.read_bytes()
    assert math.isclose(report["seconds"], soundfile.info(b).frames / 24000, abs_tol=1e-3)


def test_an_output_that_could_pass_4_gib_is_rf64(tmp_path, monkeypatch):
    """RIFF's sizes stop at 4 GiB: a 1 MiB text file of 500-token lines could pass them, so such a run writes
    RF64. Shown with the limit lowered to a few bytes: the same samples, in RF64, read back whole."""
    assert speak.wav_container(1, 500, False) == "WAV" and speak.wav_container(10_000, 500, False) == "RF64"
    assert speak.wav_container(1927, 500, False) == "WAV" and speak.wav_container(1928, 500, False) == "RF64"
    assert speak.wav_container(3855, 500, True) == "WAV" and speak.wav_container(3856, 500, True) == "RF64"
    args = [*FAST, "--text", "Hi.", "--audio", VOICE, "--seed", "7", "--pcm16"]
    assert speak.main([*map(str, args), "--out", str(tmp_path / "riff.wav")]) == 0
    monkeypatch.setattr(speak, "RIFF_BYTES", 1000)
    assert speak.main([*map(str, args), "--out", str(tmp_path / "rf64.wav")]) == 0
    assert soundfile.info(tmp_path / "riff.wav").format == "WAV" and soundfile.info(tmp_path / "rf64.wav").format == "RF64"
    assert (tmp_path / "rf64.wav").read_bytes()[:4] == b"RF64"
    assert np.array_equal(soundfile.read(tmp_path / "riff.wav")[0], soundfile.read(tmp_path / "rf64.wav")[0])


def test_codes_and_text_file_lines_join(tmp_path):
    codes = tmp_path / "best.npy"
    row = np.random.default_rng(0).integers(0, 8192, (2, 30))
    row[0, 10:] = 8193                                       # stops at 10: 18 latents survive the trim
    np.save(codes, row)
    one, two = tmp_path / "one.wav", tmp_path / "two.wav"
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\nSecond line.\n")
    assert cli(*FAST, "--text", "First line.", "--audio", VOICE, "--codes", codes, "--out", one).returncode == 0
    proc = cli(*FAST, "--text-file", lines, "--audio", VOICE, "--codes", codes, "--out", two)
    assert proc.returncode == 0, proc.stderr
    n = soundfile.info(one).frames
    assert n == 256 * (18 * 4 * 24000 // 22050)
    assert soundfile.info(two).frames == 2 * n


def test_ddim_and_guidance_run(tmp_path):
    out = tmp_path / "x.wav"
    proc = cli(*FAST, "--text", "Hi.", "--audio", VOICE, "--out", out, "--sampler", "ddim", "--guidance", "2", "--seed", "1")
    assert proc.returncode == 0, proc.stderr and soundfile.info(out).samplerate == 24000


# ---------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, no WAV, no input changed
# ---------------------------------------------------------------------------------------------------


def test_speak_checkpoint_loads_and_folds(tmp_path, tiny_checkpoint):
    path = tmp_path / "speak.pt"
    diffusion, vocoder = tiny_speak_file(path)
    loaded, folded = speak.load_speak(path, "cpu", 64)
    for k, v in diffusion.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for k, v in vocoder.state_dict().items():
        assert (folded.state_dict()[k] - v).abs().max() <= 1e-6, k
    out = tmp_path / "real.wav"
    proc = subprocess.run([sys.executable, str(HERE / "speak.py"), "--checkpoint", tiny_checkpoint, "--speak-checkpoint",
                           str(path), "--text", "Hi.", "--audio", str(VOICE), "--out", str(out), "--candidates", "2",
                           "--max-tokens", "12", "--diffusion-steps", "2", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert soundfile.info(out).samplerate == 24000


# ---------------------------------------------------------------------------------------------------
# The pieces, checked against what they must be
# ---------------------------------------------------------------------------------------------------


def test_resample_keeps_a_tone():
    t = torch.arange(22050, dtype=torch.float64) / 22050
    ours = speak.resample(torch.sin(2 * math.pi * 440 * t))
    assert ours.shape == (24000,) and ours.dtype == torch.float64
    exact = torch.sin(2 * math.pi * 440 * torch.arange(24000, dtype=torch.float64) / 24000)
    assert (ours - exact)[100:-100].abs().max() < 1e-3             # away from the zero-padded edges


def test_slaney_filters():
    fb = speak.slaney_mel_filters().double()
    hz = np.fft.rfftfreq(1024, 1 / 24000)
    assert fb.shape == (100, 513) and (fb >= 0).all() and (fb.sum(1) > 0).all()
    peaks = hz[fb.argmax(1).numpy()]
    assert (np.diff(peaks) >= 0).all() and peaks[0] < 150 and peaks[-1] > 10000
    # Slaney's scale is linear below 1 kHz: the bands there are equally spaced (200/3 Hz apart).
    low = peaks[peaks < 900]
    assert np.ptp(np.diff(low)) <= 2 * 24000 / 1024
    # Slaney's norm: each triangle has unit area over frequency (to the bin spacing's resolution).
    area = (fb.numpy() * (hz[1] - hz[0])).sum(1)
    assert np.allclose(area[30:], 1.0, atol=0.1) and abs(area[30:].mean() - 1) < 0.01   # (low bands: few bins)


def test_univnet_mel_of_a_tone():
    wav = torch.sin(2 * math.pi * 1000 * torch.arange(24000) / 24000)[None] * 0.5
    mel = speak.univnet_mel(wav, speak.slaney_mel_filters(), speak.dft_basis())
    assert mel.shape == (1, 100, 1 + 24000 // 256)
    band = speak.slaney_mel_filters()[:, 1000 * 1024 // 24000 + 1].argmax()
    assert int(mel[0, :, 40].argmax()) in (int(band) - 1, int(band), int(band) + 1)
    assert float(mel.min()) >= math.log(1e-5) - 1e-6


def test_respaced_timesteps_and_schedule():
    assert speak.respaced_timesteps(4) == [0, 1333, 2666, 3999]
    t30 = speak.respaced_timesteps(30)
    assert len(t30) == 30 and t30[:3] == [0, 138, 276] and t30[-2:] == [3861, 3999]
    full = speak.Schedule(4000)
    betas = np.linspace(0.25e-4, 0.25 * 0.02, 4000)
    assert torch.allclose(full.max_log, torch.from_numpy(np.log(betas)).float())
    s = speak.Schedule(30)
    assert s.alpha_bar.shape == (30,) and (s.alpha_bar[1:] < s.alpha_bar[:-1]).all() and s.alpha_bar_prev[0] == 1


def test_steps_recover_a_known_x0():
    """x_t made from a known x0 (inside the clamp) and its true noise: both samplers find x0, DDIM lands on
    the point of the same x0 and noise one level down, and DDPM's mean is the posterior mean."""
    s = speak.Schedule(30)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(1, 100, 20, generator=g) * 1.8 - 0.9, torch.randn(1, 100, 20, generator=g)
    i = 20
    x = s.alpha_bar[i].sqrt() * x0 + (1 - s.alpha_bar[i]).sqrt() * eps
    x_prev, found = speak.ddim_step(s, i, x, eps, None, None)
    assert (found - x0).abs().max() < 1e-4
    assert (x_prev - (s.alpha_bar_prev[i].sqrt() * x0 + (1 - s.alpha_bar_prev[i]).sqrt() * eps)).abs().max() < 1e-4
    sample, mean, log_variance, found = speak.ddpm_step(s, i, x, eps, torch.ones_like(x), torch.zeros_like(x))
    assert torch.equal(sample, mean) and (found - x0).abs().max() < 1e-4
    assert torch.allclose(log_variance, s.max_log[i].expand_as(x))         # v = 1: beta's variance
    zero_noise, *_ = speak.ddpm_step(s, 0, x, eps, torch.zeros_like(x), torch.ones_like(x))
    assert torch.equal(zero_noise, speak.ddpm_step(s, 0, x, eps, torch.zeros_like(x), torch.zeros_like(x))[0])


def test_guided_pair_batched_equals_two_calls():
    model, _ = speak.random_speak(speak.DiffusionConfig(64, 2, 2, 64), "cpu")
    s = speak.Schedule(10)
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 100, 30, generator=g), torch.randn(1, 64, 30, generator=g)
    with torch.no_grad():
        eps, v = speak.guided_eps(model, s, 7, x, cond, 2.0)
        t = s.timesteps[7:8]
        c, u = model(x, t, cond), model(x, t, model.unconditioned_embedding.expand(1, -1, 30))
    k = 2.0 * (1 - 7 / 10)
    assert (eps - ((1 + k) * c[:, :100] - k * u[:, :100])).abs().max() < 1e-5
    assert (v - c[:, 100:]).abs().max() < 1e-5


def test_relative_buckets():
    pos = torch.arange(200)
    b = speak.relative_buckets(pos[:, None] - pos[None, :])         # [query, key]
    assert b[5, 5] == 0 and b[5, 6] == 17 and b[6, 5] == 1            # key after the query: the upper half
    assert b[0, 7] == 16 + 7 and b[0, 8] == 16 + 8 and b[0, 199] == 31 and b[199, 0] == 15
    assert (b[0, 8:] >= b[0, 7]).all() and (b[0, 9:].diff() >= 0).all()


@pytest.mark.parametrize("length", [1, 2, 37])
def test_the_windowed_bias_is_the_whole_table_with_the_queries_reversed(length):
    """The bias as an unfold view of one row per head equals the [heads, L, L] table the original builds
    (the bucket of query - key, looked up per head), its query rows reversed; attention given the reversed
    queries and reversed back equals attention with the whole table (to float32 rounding: the kernel's sums
    depend a little on a row's place)."""
    torch.manual_seed(0)
    block = speak.AttentionBlock(32, 4)
    pos = torch.arange(length)
    table = block.relative_pos_embeddings.relative_attention_bias(speak.relative_buckets(pos[:, None] - pos[None, :]))
    table = table.permute(2, 0, 1) * 8 ** 0.5                                               # [heads, L, L]
    assert torch.equal(block.relative_pos_embeddings(length, 8 ** 0.5, torch.float32), table.flip(1))
    x = torch.randn(2, 32, length)
    with torch.no_grad():
        q, k, v = block.qkv(block.norm(x)).view(2, 4, 3, 8, length).transpose(-1, -2).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=table[None])
        assert (block(x) - (x + block.proj_out(a.transpose(-1, -2).reshape(2, 32, length)))).abs().max() < 1e-5


def test_location_variable_conv_with_one_kernel_is_a_conv():
    g = torch.Generator().manual_seed(2)
    x, w, bias = torch.randn(1, 4, 5 * 8, generator=g), torch.randn(6, 4, 3, generator=g), torch.randn(6, generator=g)
    kernel = w.permute(1, 0, 2)[None, ..., None].expand(1, 4, 6, 3, 5)
    ours = speak.location_variable_conv(x, kernel, bias[None, :, None].expand(1, 6, 5), 8)
    assert (ours - F.conv1d(x, w, bias, padding=1)).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")        # the original's (old-style) weight norm
def test_fold_weight_norm_matches_torch():
    for module in (torch.nn.Conv1d(3, 5, 7), torch.nn.ConvTranspose1d(4, 4, 16, stride=8)):
        normed = torch.nn.utils.weight_norm(module)
        with torch.no_grad():
            normed.weight_g.mul_(1.5)
            normed(torch.zeros(1, module.in_channels, 16))             # recomputes .weight from g and v
        folded = speak.fold_weight_norm({k: v.detach() for k, v in normed.state_dict().items()})
        assert set(folded) == {"weight", "bias"}
        assert (folded["weight"] - normed.weight).abs().max() < 1e-6


def test_calm_trim():
    codes = torch.randint(0, 80, (500,))
    assert speak.calm_length(codes) == 500
    fixed = clvp.fix_candidates(codes[None, :100], 8193, 500)[0][0]
    assert speak.calm_length(fixed) == 108
    codes[50:58] = 83                                                  # a run of 8 is not enough
    assert speak.calm_length(codes) == 500


def test_speech_latents_are_causal(tiny_checkpoint):
    model = clvp.load_model(tiny_checkpoint, "cpu")
    g = torch.Generator().manual_seed(3)
    latent, text = torch.randn(1, model.config.decoder.dim, generator=g), torch.randint(3, 200, (1, 6), generator=g)
    codes = torch.randint(0, 8192, (1, 20), generator=g)
    changed = codes.clone()
    changed[0, 10] = (codes[0, 10] + 1) % 8192
    with torch.no_grad():
        a, b = speak.speech_latents(model, latent, text, codes), speak.speech_latents(model, latent, text, changed)
    assert a.shape == (1, 20, model.config.decoder.dim)
    assert torch.equal(a[:, :11], b[:, :11]) and (a[:, 11:] - b[:, 11:]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------
# Conversion: Tortoise's two files -> speak.pt (convert_weights.py)
# ---------------------------------------------------------------------------------------------------


def test_convert_tortoise_audio_files(tmp_path):
    blob_path = tmp_path / "blob.pt"
    diffusion, vocoder = tiny_speak_file(blob_path)
    blob = clvp.read_tensor_file(blob_path, lambda blob: None)
    state = dict(original_speak_names("diffusion", blob["diffusion"]), **{"code_embedding.weight": torch.zeros(8193, 64), "mel_head.bias": torch.zeros(100)})
    torch.save(state, tmp_path / "diffusion_decoder.pth")
    torch.save({"model_g": original_speak_names("vocoder", blob["vocoder"]), "optim_g": {}}, tmp_path / "vocoder.pth")
    args = ["--tortoise-diffusion", tmp_path / "diffusion_decoder.pth", "--tortoise-vocoder", tmp_path / "vocoder.pth"]
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), *map(str, args), "-o",
                           str(tmp_path / "speak.pt"), "--verbose"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped code_embedding.weight" in proc.stdout and "skipped mel_head.bias" in proc.stdout
    loaded, _ = speak.load_speak(tmp_path / "speak.pt", "cpu", 64)
    for k, v in diffusion.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.save(blob["vocoder"], tmp_path / "plain.pth")                # model_g missing
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), *map(str, args[:3]),
                           str(tmp_path / "plain.pth"), "-o", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "under model_g" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), *map(str, args[:2]), "-o",
                           str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "both --tortoise-diffusion and --tortoise-vocoder" in proc.stderr


def test_convert_tortoise_audio_files_in_half_precision(tmp_path):
    """--dtype applies to speak.pt as to clvp.pt: float16 halves the file, and speak.py loads it as the fp32
    weights rounded to fp16."""
    diffusion, _ = tiny_speak_file(tmp_path / "blob.pt")
    blob = clvp.read_tensor_file(tmp_path / "blob.pt", lambda blob: None)
    torch.save(original_speak_names("diffusion", blob["diffusion"]), tmp_path / "diffusion_decoder.pth")
    torch.save({"model_g": original_speak_names("vocoder", blob["vocoder"])}, tmp_path / "vocoder.pth")
    for dtype in ("float32", "float16"):
        assert convert_weights.main(["--tortoise-diffusion", str(tmp_path / "diffusion_decoder.pth"), "--tortoise-vocoder",
                                     str(tmp_path / "vocoder.pth"), "-o", str(tmp_path / f"{dtype}.pt"),
                                     "--dtype", dtype]) == 0
    assert (tmp_path / "float16.pt").stat().st_size < 0.55 * (tmp_path / "float32.pt").stat().st_size
    loaded, _ = speak.load_speak(tmp_path / "float16.pt", "cpu", 64)
    for k, v in diffusion.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().to(v.dtype)), k


def test_bf16_audio_stages_agree_with_fp32():
    """--dtype bfloat16 runs the diffusion network and UnivNet in bf16 (the sampler's own math stays fp32).
    Relative L2 against fp32 on random weights, measured at the official size and 3 s: one network pass
    1.8e-2, a whole 30-step mel 1.3e-2, UnivNet on a [-1, 1] mel 2.3e-2 (up to 8e-2 on short clips: bf16
    holds the log-mel's -11..2 range to about 0.04). Bounds here: 5e-2 for the network, 15e-2 for UnivNet."""
    def relative(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    diffusion, vocoder = speak.random_speak(speak.DiffusionConfig(64, 2, 2, 64), "cpu")
    d16, v16 = speak.random_speak(speak.DiffusionConfig(64, 2, 2, 64), "cpu", torch.bfloat16)
    x, t, cond = torch.randn(1, 100, 40), torch.tensor([1000]), torch.randn(1, 64, 40)
    mel = torch.rand(1, 100, 20) * 2 - 1
    with torch.inference_mode():
        assert relative(d16(x.bfloat16(), t, cond.bfloat16()), diffusion(x, t, cond)) < 0.05
        assert relative(speak.vocode(v16, mel, torch.Generator().manual_seed(0)),
                        speak.vocode(vocoder, mel, torch.Generator().manual_seed(0))) < 0.15
        eps, v = speak.guided_eps(d16, speak.Schedule(30), 29, x, cond.bfloat16(), 2.0)
        assert eps.dtype == v.dtype == torch.float32
        out = speak.sample_mel(d16, cond.bfloat16(), 3, generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32 and out.shape == (1, 100, 40)


def test_dtype_bfloat16_writes_a_wav(tmp_path):
    out = tmp_path / "bf16.wav"
    proc = cli(*FAST, "--text", "Hi.", "--audio", VOICE, "--out", out, "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    wav, rate = soundfile.read(out)
    assert rate == 24000 and len(wav) > 0 and np.isfinite(wav).all()


# ---------------------------------------------------------------------------------------------------
# The fast path: HiFi-GAN (--decoder hifigan), the stream, --out -
# ---------------------------------------------------------------------------------------------------

HIFI = ["--random-init", "--tiny", "--decoder", "hifigan", "--quiet"]


def hifigan_original_state(hifigan):
    """Our HifiGan's weights as hifidecoder.pth holds them: each conv under weight norm (g and v), g != |v|."""
    state = {}
    for name, t in hifigan.state_dict().items():
        if name.endswith("weight") and not name.startswith("cond_layer"):
            v = t * 1.7
            norm = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
            state[name + "_v"], state[name + "_g"] = v, norm / 1.7
        else:
            state[name] = t
    return state


def test_the_hifigan_path_writes_the_stretched_length(tmp_path):
    """--codes through HiFi-GAN: a row with a stop token is spoken through it (api_fast's tts), 256 samples per
    24 kHz frame of floor(floor(4 S) * 24000 / 22050); clvp.py's fixed row (no stop) up to its calm run."""
    row = np.random.default_rng(0).integers(0, 8192, (1, 40))
    row[0, 25] = 8193
    np.save(tmp_path / "raw.npy", row)
    fixed = clvp.fix_candidates(torch.from_numpy(row), 8193, 500)[0].numpy()
    np.save(tmp_path / "fixed.npy", fixed)
    for name, spoken in (("raw", 26), ("fixed", 25 + 8)):
        proc = cli(*HIFI, "--text", "Hello.", "--audio", VOICE, "--codes", tmp_path / f"{name}.npy", "--out",
                   tmp_path / f"{name}.wav")
        assert proc.returncode == 0, proc.stderr
        assert soundfile.info(tmp_path / f"{name}.wav").frames == 256 * int(int(4 * spoken) * 24000 / 22050), name


def test_stretch_is_linear_interpolation():
    latents = torch.arange(5.0)[None, :, None].expand(1, 5, 3)                 # a ramp 0..4 over the codes
    frames = speak.stretch(latents)
    assert frames.shape == (1, 3, int(20 * 24000 / 22050))
    assert (frames.diff(dim=-1) >= -1e-6).all() and frames.min() >= 0 and frames.max() <= 4   # monotone, in range


def test_the_crossfade_of_an_unchanging_signal_is_the_signal():
    """Decodes that agree where they overlap (each a prefix of one signal) must play back as that signal: the
    two ramps sum to one, nothing is played twice or skipped, and the last chunk plays the held-back tail, also
    when the last decode adds nothing (where the original crashes)."""
    signal = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    for ends in ((6000, 9000, 14000, 20000), (6000, 20000, 20000), (20000,)):
        fade = speak.Crossfade()
        played = torch.cat([fade.chunk(signal[:end], last=i == len(ends) - 1) for i, end in enumerate(ends)])
        assert played.shape == signal.shape and (played - signal).abs().max() < 1e-6, ends
    one = speak.Crossfade().chunk(signal[:700], last=True)                     # a stream of one short decode
    assert torch.equal(one, signal[:700])


def test_a_stream_of_given_codes_is_the_same_through_a_pipe_and_a_wav(tmp_path):
    """--stream replays --codes through the cached generation; --out - sends the same samples as 16-bit PCM."""
    row = np.random.default_rng(1).integers(0, 8192, (1, 130))
    row[0, 120] = 8193                                                       # decodes at 60, 100, then 121
    np.save(tmp_path / "codes.npy", row)
    args = [*HIFI, "--stream", "--text", "Hello.", "--audio", VOICE, "--codes", tmp_path / "codes.npy"]
    proc = cli(*args, "--out", tmp_path / "stream.wav")
    assert proc.returncode == 0, proc.stderr
    wav, sr = soundfile.read(tmp_path / "stream.wav", dtype="float32")
    assert sr == 24000 and len(wav) == 256 * int(int(4 * 121) * 24000 / 22050)
    pipe = subprocess.run([sys.executable, str(HERE / "speak.py"), *map(str, args), "--out", "-"], capture_output=True)
    assert pipe.returncode == 0, pipe.stderr
    pcm = np.frombuffer(pipe.stdout, dtype="<i2")
    assert len(pcm) == len(wav) and np.abs(pcm - np.round(np.clip(wav, -1, 1) * 32767)).max() <= 1


def test_a_stream_arrives_before_the_decoder_has_finished():
    """The first PCM bytes are read while speak.py is still sampling (its first chunk comes at 60 of 150 tokens)."""
    proc = subprocess.Popen([sys.executable, str(HERE / "speak.py"), *HIFI, "--stream", "--text", "Hello there.",
                             "--audio", str(VOICE), "--max-tokens", "150", "--seed", "0", "--out", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(2)
    running = proc.poll() is None
    rest = proc.stdout.read()
    proc.wait()
    assert proc.returncode == 0 and len(first) == 2 and running, proc.stderr.read()
    assert len(first + rest) == 2 * 256 * int(int(4 * 150) * 24000 / 22050)   # random weights never stop


def test_a_player_that_quits_ends_the_stream_in_one_line():
    """EPIPE: the reader takes 1000 bytes and closes the pipe; speak.py stops with one line, exit code 0."""
    proc = subprocess.Popen([sys.executable, str(HERE / "speak.py"), *HIFI, "--stream", "--text", "Hello there.",
                             "--audio", str(VOICE), "--max-tokens", "150", "--out", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1000)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait()
    lines = [line for line in err.splitlines() if not line.startswith("NOTE: --random-init")]
    assert proc.returncode == 0 and len(lines) == 1 and "standard output was closed" in lines[0], err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_hifigan_checkpoint_converts_folds_and_loads(tmp_path):
    """--tortoise-hifigan: g * v / |v| folded once, a stray tensor skipped as api_fast's strict=False skips it,
    and speak.py's loader gives back the weights HifiGan was built with."""
    torch.manual_seed(0)
    hifigan = speak.HifiGan(96, 32).eval()
    state = hifigan_original_state(hifigan)
    torch.save({**state, "speaker_encoder.fc.weight": torch.zeros(2, 2)}, tmp_path / "hifidecoder.pth")
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), "--tortoise-hifigan",
                           str(tmp_path / "hifidecoder.pth"), "-o", str(tmp_path / "hifigan.pt"), "--verbose"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipped speaker_encoder.fc.weight" in proc.stdout
    loaded = speak.load_hifigan(tmp_path / "hifigan.pt", "cpu", 96)
    for k, v in hifigan.state_dict().items():
        assert (loaded.state_dict()[k] - v).abs().max() < 1e-6, k
    x, voice = torch.randn(1, 7, 96), torch.randn(1, 96)
    with torch.no_grad():
        assert (speak.hifigan_decode(loaded, x, voice) - speak.hifigan_decode(hifigan, x, voice)).abs().max() < 1e-5
    del state["conv_post.bias"]
    torch.save(state, tmp_path / "broken.pth")
    proc = subprocess.run([sys.executable, str(HERE / "convert_weights.py"), "--tortoise-hifigan",
                           str(tmp_path / "broken.pth"), "-o", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "conv_post.bias" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_a_long_paragraph_is_spoken_part_by_part_into_one_wav(tmp_path):
    """A 2,000-character --text: cut as read.py cuts it (clvp.split_text), each part spoken in turn, one WAV."""
    sentences = ["The wind rose over the hills at dawn, and the shepherds counted their flocks twice.",
                 "Nobody spoke of the storm that had passed; it was enough that the bridge still stood!",
                 "\"Will it hold another winter?\" asked the miller, who trusted nothing built by his cousin."]
    text = " ".join(sentences[i % 3] for i in range(24))[:2000]
    parts = clvp.split_text(text)
    assert len(text) == 2000 and len(parts) >= 8 and all(len(p) <= 300 for p in parts)
    proc = cli(*HIFI, "--text", text, "--audio", VOICE, "--max-tokens", "4", "--out", tmp_path / "long.wav", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    per_part = 256 * int(int(4 * 4) * 24000 / 22050)             # 4 codes each: random weights never stop
    assert report["parts"] == len(parts) and soundfile.info(tmp_path / "long.wav").frames == len(parts) * per_part
