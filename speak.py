"""speak.py: Tortoise's last two stages, speech tokens -> a 24 kHz WAV, in one file beside clvp.py.

clvp.py ends with the speech tokens CLVP picked. Tortoise turns them into audio in two more networks:

    best tokens [1, 500] --Decoder (teacher-forced, training positions)--> AR latents [1, 500, 1024]
        --calm-token trim--> [1, S, 1024]
    voice.wav --resample 24 kHz--> --100-band log-mel--> --contextual embedder--> diffusion voice latent [1, 2048]
    [AR latents, voice latent] --timestep_independent--> conditioning [1, 1024, L]      (L = S * 4 * 24000 // 22050)
    noise [1, 100, L] --DiffusionTts, N respaced DDPM (or DDIM) steps--> mel [1, 100, L] in [-1, 1]
        --denormalise--> log-mel --UnivNet--> wav [1, 1, 256 * L] at 24 kHz

Its parts are numbered as clvp.py's: Part I is the lesson, in that order; Part III checks what comes in
(speak.pt, --codes, the options) before any work; Part IV is the command line. There is no Part II: the
audio stages run as the lesson writes them (their one speed idea, the position bias read as a view of one
row, is plain enough to be the lesson's own). It imports clvp for everything before the tokens (text, audio
loading, the decoder, generation and ranking) and for its boundary helpers; clvp.py imports nothing of
this file. Numbers match the original Tortoise code on the same weights (test_tortoise.py).
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import soundfile
import torch
import torch.nn as nn
import torch.nn.functional as F

import clvp

# ===================================================================================================
# Part I: the lesson, from the best candidate to a waveform
# ===================================================================================================

SAMPLE_RATE = 24000             # Hz: the diffusion model and UnivNet work at 24 kHz, the decoder at 22.05 kHz
N_MELS = 100                    # UnivNet's mel bands (clvp.py's conditioning encoder reads 80)
VOICE_SAMPLES = 102400          # 4.27 s at 24 kHz: what get_conditioning_latents keeps of each clip
CALM_CODE, CALM_RUN = clvp.FIX_STOP_CODE, 8   # code 83 is silence; more than 8 in a row ends the speech
MEL_MIN, MEL_MAX = -11.512925148010254, 2.3143386840820312   # the log-mel range the sampler's [-1, 1] maps to
VOCODER_PAD = -11.5129          # UnivNet's padding frames (not quite MEL_MIN: the original's rounded constant)
TRAINED_STEPS = 4000            # the diffusion model was trained with 4000 noise levels
# UnivNet's STFT (Tortoise's TacotronSTFT for the diffusion model): the same numbers as clvp.py's 22.05 kHz
# mel uses, but its own, at 24 kHz: 1024-sample frames (42.7 ms) every 256 samples (10.7 ms).
STFT_N_FFT, STFT_HOP = 1024, 256


# ---------------------------------------------------------------------------------------------------
# AR latents: what the decoder "meant" at each code, and where the speech ends
#
# The diffusion model is conditioned not on the codes but on the decoder's last hidden states for them.
# Tortoise re-runs the decoder once, teacher-forced, over [voice latent, text, 8192, codes, 8193] with the
# positions it was *trained* with (speech positions 0, 1, 2, ...; sampling skipped position 1), through
# GPT-2's ln_f and UnifiedVoice's final_norm, with no head. Latent i is the hidden state at the input that
# predicts code i: the start token's for code 0, code i - 1's for code i.
# ---------------------------------------------------------------------------------------------------

def speech_latents(model, latent, text_ids, codes):
    """The voice latent [1, D], raw text ids [1, T], fixed codes [B, S] -> AR latents [B, S, D]."""
    dec = model.decoder
    B, S = codes.shape
    prompt = dec.prompt(latent.expand(B, -1), text_ids.expand(B, -1))                    # ends in 8192 at 0
    speech = dec.speech_embedding(codes[:, :-1]) + dec.speech_positions.weight[1:S]      # training positions
    h = dec(torch.cat([prompt, speech], dim=1))                                           # causal: the last code
    return dec.final_norm(dec.norm(h[:, prompt.shape[1] - 1:]))                           # and 8193 change nothing


def calm_length(codes):
    """How many latents Tortoise keeps for one candidate's codes [S]: up to (not including) the code where
    the 9th consecutive 83 appears, so a candidate that stopped at s keeps s + 8; all S if none does."""
    run = 0
    for i, code in enumerate(codes.tolist()):
        run = run + 1 if code == CALM_CODE else 0
        if run > CALM_RUN:
            return i
    return len(codes)


# ---------------------------------------------------------------------------------------------------
# The diffusion front end: 22.05 kHz -> 24 kHz, then UnivNet's 100-band log-mel
#
# Resampling is torchaudio's default windowed sinc (Hann window, 6 zero crossings, rolloff 0.99), which
# Tortoise calls; written here with torch. 22050 -> 24000 reduces to 147 -> 160: every 147 input samples
# give 160 outputs, each output phase with its own 161-tap filter, so the whole thing is one strided conv.
# The mel is Tacotron's: a centred DFT as a convolution with a periodic-Hann-windowed basis, the
# *magnitude* (clvp.py's mel uses power), librosa's default mel filters (Slaney's mel scale, which is
# linear below 1 kHz, and Slaney's area norm), log(clamp(., 1e-5)), no per-band norms.
# ---------------------------------------------------------------------------------------------------

def resample(wav, orig=clvp.SAMPLE_RATE, new=SAMPLE_RATE, zeros=6, rolloff=0.99):
    """[samples] at `orig` Hz -> [ceil(samples * new / orig)] at `new` Hz, computed in wav's dtype."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    cutoff = min(orig, new) * rolloff                                # in units of the reduced input rate
    width = math.ceil(zeros * orig / cutoff)                         # input samples the filter reaches each side
    idx = torch.arange(-width, width + orig, dtype=wav.dtype, device=wav.device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=wav.dtype, device=wav.device)[:, None, None] / new + idx
    t = (t * cutoff).clamp(-zeros, zeros)                            # [new, 1, 2 * width + orig]
    window = torch.cos(t * math.pi / zeros / 2) ** 2                 # Hann, zero at the last crossing
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * (window * (cutoff / orig))
    out = F.conv1d(F.pad(wav[None, None], (width, width + orig)), kernel, stride=orig)   # [1, new, frames]
    return out[0].T.reshape(-1)[:math.ceil(new * len(wav) / orig)]   # interleave the phases


def slaney_mel_filters(sr=SAMPLE_RATE, n_fft=STFT_N_FFT, n_mels=N_MELS, f_min=0.0, f_max=SAMPLE_RATE / 2):
    """[n_mels, n_fft // 2 + 1] triangles on Slaney's mel scale with Slaney's norm, as librosa.filters.mel."""
    lin, log_start, log_step = 200.0 / 3, 1000.0, math.log(6.4) / 27     # 15 mels at 1 kHz, then logarithmic
    def hz_to_mel(f):
        return f / lin if f < log_start else log_start / lin + math.log(f / log_start) / log_step
    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    hz = np.where(mels < log_start / lin, mels * lin, log_start * np.exp(log_step * (mels - log_start / lin)))
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sr)                                  # [513]
    ramps = hz[:, None] - fft_hz[None]                                         # [n_mels + 2, 513]
    lower, upper = -ramps[:-2] / np.diff(hz)[:-1, None], ramps[2:] / np.diff(hz)[1:, None]
    fb = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)            # librosa fills float32 rows
    fb *= (2.0 / (hz[2:] - hz[:-2]))[:, None]                                  # unit area per band
    return torch.from_numpy(fb)


def dft_basis(n_fft=STFT_N_FFT):
    """[2 * (n_fft // 2 + 1), 1, n_fft]: the real then the imaginary rows of the DFT, windowed (periodic Hann),
    built in float64 and rounded to float32 as Tacotron's STFT builds its conv weights."""
    dft = np.fft.fft(np.eye(n_fft))[:n_fft // 2 + 1]
    basis = torch.from_numpy(np.vstack([dft.real, dft.imag])[:, None, :]).float()
    return basis * torch.hann_window(n_fft, periodic=True, dtype=torch.float64).float()


def univnet_mel(wav, filters, basis):
    """[B, samples] at 24 kHz -> log-mel [B, 100, 1 + samples // 256]."""
    x = F.pad(wav.clamp(-1, 1)[:, None], (STFT_N_FFT // 2, STFT_N_FFT // 2), mode="reflect")
    spec = F.conv1d(x, basis, stride=STFT_HOP)                                 # [B, 1026, frames]
    real, imag = spec.chunk(2, dim=1)
    magnitude = torch.sqrt(real ** 2 + imag ** 2)                              # magnitude, not power
    return torch.log(torch.clamp(filters @ magnitude, min=1e-5))


def diffusion_voice_mels(paths, device):
    """Reference clips -> [C, 100, 401]: each at 24 kHz, padded or cut to its first 4.27 s (102400 samples)."""
    seconds = VOICE_SAMPLES / SAMPLE_RATE + 0.01     # a few samples past the cut, so resampling sees them
    wavs = []
    for path in paths:
        wav = resample(clvp.load_audio(path, seconds=seconds))
        wavs.append(F.pad(wav, (0, max(0, VOICE_SAMPLES - len(wav))))[:VOICE_SAMPLES])
    return univnet_mel(torch.stack(wavs).to(device), slaney_mel_filters().to(device), dft_basis().to(device))


# ---------------------------------------------------------------------------------------------------
# DiffusionTts: attention with a relative position bias, residual blocks with a time embedding
#
# The modules keep the original's names, except where it numbered the layers of an nn.Sequential: those
# have names of their own here (in_norm, in_conv, ...), and convert_weights.py renames them, as it renames
# clvp.pt's. Every GroupNorm uses clvp's rule for groups. Attention is the guided-diffusion
# block: GroupNorm, one 1x1 conv making q, k, v with the heads interleaved ([heads, 3 * head_dim], read
# here as a view), and a T5-style bias per head from 32 buckets of relative distance (16 each way: exact
# up to 8, logarithmic up to 64), which the original multiplies by sqrt(head_dim) before adding it to the
# already-scaled scores. scaled_dot_product_attention takes the bias as an additive mask.
# ---------------------------------------------------------------------------------------------------

def relative_buckets(distance, buckets=32, max_distance=64):
    """The bucket of each (query - key) distance, T5's non-causal rule, in the original's float32 steps."""
    half = buckets // 2
    ret = (distance < 0).long() * half
    n = distance.abs()
    exact = half // 2
    large = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return ret + torch.where(n < exact, n, large.clamp(max=half - 1))


class RelativePositionBias(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(32, heads)

    def forward(self, length, scale, dtype):
        """[heads, length, length]: each head's bias, times scale, for (query, key) with the queries in
        reverse order. The bias depends on query - key only, so one row of 2 * length - 1 values per head
        holds all of it; with the queries reversed, row i of the matrix is that row's window [i, i + length),
        and unfold reads every window in place. A [heads, length, length] table would be 300 MB per block
        for a 500-token line, and 3 GB if each of the 10 blocks kept one between steps."""
        distance = torch.arange(length - 1, -length, -1, device=self.relative_attention_bias.weight.device)
        row = (self.relative_attention_bias(relative_buckets(distance)).T * scale).to(dtype)   # [heads, 2L - 1]
        return row.unfold(1, length, 1)


class AttentionBlock(nn.Module):
    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(clvp.groupnorm_groups(channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.relative_pos_embeddings = RelativePositionBias(heads)

    def forward(self, x):                                             # x: [B, C, T]
        B, C, T = x.shape
        qkv = self.qkv(self.norm(x)).view(B, self.heads, 3, C // self.heads, T)
        q, k, v = qkv.transpose(-1, -2).unbind(2)                     # [B, heads, T, head_dim] each
        bias = self.relative_pos_embeddings(T, (C // self.heads) ** 0.5, q.dtype)    # [heads, T, T], a view
        a = F.scaled_dot_product_attention(q.flip(2), k, v, attn_mask=bias[None]).flip(2)  # queries reversed, back
        return x + self.proj_out(a.transpose(-1, -2).reshape(B, C, T))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv1x1, then the time embedding as a scale and shift of the second GroupNorm,
    SiLU, conv k3 (the original's Dropout there does nothing at inference)."""
    def __init__(self, dim):
        super().__init__()
        self.in_norm, self.in_conv = nn.GroupNorm(clvp.groupnorm_groups(dim), dim), nn.Conv1d(dim, dim, 1)
        self.emb = nn.Linear(dim, 2 * dim)
        self.out_norm, self.out_conv = nn.GroupNorm(clvp.groupnorm_groups(dim), dim), nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, x, time_emb):                                   # x: [B, C, T], time_emb: [B, C]
        h = self.in_conv(F.silu(self.in_norm(x)))
        scale, shift = self.emb(F.silu(time_emb))[..., None].chunk(2, dim=1)   # [B, C, 1] each
        h = self.out_norm(h) * (1 + scale) + shift
        return x + self.out_conv(F.silu(h))


class DiffusionLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.resblk = ResBlock(dim)
        self.attn = AttentionBlock(dim, heads)

    def forward(self, x, time_emb):
        return self.attn(self.resblk(x, time_emb))


def timestep_embedding(t, dim, max_period=10000):
    """Original timesteps [B] -> [B, dim]: cosines then sines of t at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass(frozen=True)
class DiffusionConfig:
    dim: int = 1024                 # model_channels; the voice embedder runs at 2 * dim
    layers: int = 10                # DiffusionLayers after the input (then 3 ResBlocks)
    heads: int = 16                 # in every attention block, the voice embedder's too
    latent_dim: int = 1024          # the AR decoder's width


class DiffusionTts(nn.Module):
    """The parts of Tortoise's DiffusionTts that inference runs (its code_embedding, code_converter and
    mel_head only served training from codes)."""
    def __init__(self, c: DiffusionConfig = DiffusionConfig()):
        super().__init__()
        d, h = c.dim, c.heads
        self.config = c
        # the voice: two stride-2 convs, then attention (the original's contextual_embedder)
        self.voice_conv1 = nn.Conv1d(N_MELS, d, 3, padding=1, stride=2)
        self.voice_conv2 = nn.Conv1d(d, 2 * d, 3, padding=1, stride=2)
        self.voice_attention = nn.ModuleList(AttentionBlock(2 * d, h) for _ in range(5))
        # the AR latents: a conv, then attention (the original's latent_conditioner)
        self.latent_conv = nn.Conv1d(c.latent_dim, d, 3, padding=1)
        self.latent_attention = nn.ModuleList(AttentionBlock(d, h) for _ in range(4))
        self.code_norm = nn.GroupNorm(clvp.groupnorm_groups(d), d)
        self.unconditioned_embedding = nn.Parameter(torch.randn(1, d, 1))
        self.time_fc1, self.time_fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.conditioning_timestep_integrator = nn.ModuleList(DiffusionLayer(d, h) for _ in range(3))
        self.inp_block = nn.Conv1d(N_MELS, d, 3, padding=1)
        self.integrating_conv = nn.Conv1d(2 * d, d, 1)
        self.layers = nn.ModuleList([DiffusionLayer(d, h) for _ in range(c.layers)] + [ResBlock(d) for _ in range(3)])
        self.out_norm, self.out_conv = nn.GroupNorm(clvp.groupnorm_groups(d), d), nn.Conv1d(d, 2 * N_MELS, 3, padding=1)

    def diffusion_latent(self, mels):
        """mels [C, 100, frames] of one voice -> [1, 2 * dim]: the mean over every clip's every frame."""
        e = self.voice_conv2(self.voice_conv1(mels))                  # [C, 2 * dim, frames / 4]
        for block in self.voice_attention:
            e = block(e)
        return e.transpose(0, 1).reshape(e.shape[1], -1).mean(dim=1)[None]

    def timestep_independent(self, latents, voice, length):
        """AR latents [B, S, latent_dim], voice [B, 2 * dim] -> conditioning [B, dim, length], once per
        candidate: the latents through conv + attention, normalised, scaled and shifted by the two halves
        of the voice latent, then stretched to the mel's length by nearest-neighbour repetition."""
        scale, shift = voice[..., None].chunk(2, dim=1)               # [B, dim, 1] each
        code = self.latent_conv(latents.transpose(1, 2))              # [B, dim, S]
        for block in self.latent_attention:
            code = block(code)
        return F.interpolate(self.code_norm(code) * (1 + scale) + shift, size=length, mode="nearest")

    def forward(self, x, t, conditioning):
        """Noisy mels x [B, 100, L], original timesteps t [B], conditioning [B, dim, L] -> [B, 200, L]: the
        predicted noise, then the variance interpolation values. Conditioning-free rows get the learned
        unconditioned_embedding as their conditioning (see guided_eps)."""
        time_emb = self.time_fc2(F.silu(self.time_fc1(timestep_embedding(t, self.config.dim).to(x.dtype))))  # [B, dim]
        code = conditioning
        for layer in self.conditioning_timestep_integrator:
            code = layer(code, time_emb)
        h = self.integrating_conv(torch.cat([self.inp_block(x), code], dim=1))   # [B, dim, L]
        for layer in self.layers:
            h = layer(h, time_emb)
        return self.out_conv(F.silu(self.out_norm(h)))


# ---------------------------------------------------------------------------------------------------
# The sampler: Tortoise's respaced DDPM with learned-range variance (and DDIM)
#
# Training used 4000 noise levels with linear betas 0.25 * (1e-4 .. 0.02). Sampling keeps N of them,
# evenly spaced ([0, 138, ..., 3999] for N = 30) and recomputes betas so the kept levels have the same
# cumulative alphas. Each step i (N - 1 down to 0) asks the network at original timestep t_i for the noise
# eps and a value v in [-1, 1]; x0 = (x - sqrt(1 - a) eps) / sqrt(a), clamped to [-1, 1]; the posterior mean
# from x0 and x; the log-variance interpolated by (v + 1) / 2 between the posterior's and beta's; plus noise,
# masked at i = 0 but drawn all the same. The schedule is float64, each value rounded to float32 before use.
#
# Guidance: eps = (1 + k') eps_cond - k' eps_free, where eps_free comes from the same network with the
# learned unconditioned_embedding in place of the conditioning, and k' = k * (1 - i / N): the loop runs i
# from N - 1 down to 0, so k' ramps from k / N at the noisiest step up to k at the last. The two passes
# run as one batch of 2 here.
# DDIM (eta 0) is deterministic: x_prev = x0 sqrt(a_prev) + sqrt(1 - a_prev) eps(x0). Tortoise's loop still
# draws a noise tensor each step (and multiplies it by sigma = 0); so does this one, to keep UnivNet's z
# in step with the original.
# ---------------------------------------------------------------------------------------------------

PRESETS = {"ultra_fast": (30, 0.0), "fast": (80, 2.0), "standard": (200, 2.0), "high_quality": (400, 2.0)}


def respaced_timesteps(steps, trained=TRAINED_STEPS):
    """The original's space_timesteps(trained, [steps]): a float stride accumulated and rounded half-even."""
    stride = (trained - 1) / (steps - 1) if steps > 1 else 1
    taken, at = [], 0.0
    for _ in range(steps):
        taken.append(round(at))
        at += stride
    return sorted(set(taken))


class Schedule:
    """Per respaced step i: the original timestep and each coefficient a step needs, float32 [N]."""
    def __init__(self, steps):
        betas = np.linspace(0.25 * 1e-4, 0.25 * 0.02, TRAINED_STEPS, dtype=np.float64)
        kept = respaced_timesteps(steps)
        trained_cumprod = np.cumprod(1.0 - betas)[kept]
        betas = 1.0 - trained_cumprod / np.append(1.0, trained_cumprod[:-1])    # the respaced betas
        alpha_bar = np.cumprod(1.0 - betas)                 # the cumulative product of (1 - beta): alpha-bar
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        f32 = lambda v: torch.from_numpy(np.asarray(v).astype(np.float32))
        self.steps, self.timesteps = len(kept), torch.tensor(kept)
        self.sqrt_recip_ab, self.sqrt_recipm1_ab = f32(np.sqrt(1.0 / alpha_bar)), f32(np.sqrt(1.0 / alpha_bar - 1))
        self.alpha_bar, self.alpha_bar_prev = f32(alpha_bar), f32(alpha_bar_prev)
        self.coef_x0 = f32(betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar))
        self.coef_xt = f32((1.0 - alpha_bar_prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar))
        # log(0) at step 0 is avoided as the original does: step 1's variance stands in for it
        self.min_log = f32(np.log(np.append(posterior_variance[1], posterior_variance[1:])))
        self.max_log = f32(np.log(betas))


def predict_x0(s, i, x, eps):
    return (s.sqrt_recip_ab[i] * x - s.sqrt_recipm1_ab[i] * eps).clamp(-1, 1)


def ddpm_step(s, i, x, eps, v, noise):
    """One ancestral step -> (x_prev, mean, log_variance, x0); eps, v: the network's two halves [B, 100, L]."""
    x0 = predict_x0(s, i, x, eps)
    mean = s.coef_x0[i] * x0 + s.coef_xt[i] * x
    frac = (v + 1) / 2
    log_variance = frac * s.max_log[i] + (1 - frac) * s.min_log[i]
    return mean + float(i != 0) * torch.exp(0.5 * log_variance) * noise, mean, log_variance, x0


def ddim_step(s, i, x, eps, v, noise):
    """One DDIM step at eta 0 -> (x_prev, x0); v and noise are unused (the noise was drawn anyway)."""
    x0 = predict_x0(s, i, x, eps)
    eps = (s.sqrt_recip_ab[i] * x - x0) / s.sqrt_recipm1_ab[i]    # the noise x0 implies, after the clamp
    return x0 * torch.sqrt(s.alpha_bar_prev[i]) + torch.sqrt(1 - s.alpha_bar_prev[i]) * eps, x0


def guided_eps(model, s, i, x, conditioning, guidance):
    """The network at step i -> (eps, v) [1, 100, L] each; with guidance > 0 the conditioned and the
    conditioning-free rows run as one batch and eps is mixed with the ramped weight."""
    t, x = s.timesteps[i:i + 1].to(x.device), x.to(conditioning.dtype)    # the network in its dtype, the rest fp32
    if not guidance:
        return model(x, t, conditioning).float().chunk(2, dim=1)
    free = model.unconditioned_embedding.expand(1, -1, x.shape[-1])
    out = model(x.expand(2, -1, -1), t.expand(2), torch.cat([conditioning, free])).float()
    (eps, v), eps_free = out[:1].chunk(2, dim=1), out[1:, :N_MELS]
    k = guidance * (1 - i / s.steps)
    return (1 + k) * eps - k * eps_free, v


def sample_mel(model, conditioning, steps, guidance=0.0, temperature=1.0, sampler="ddpm", generator=None,
               progress=None):
    """conditioning [1, dim, L] -> a mel [1, 100, L] in [-1, 1]. Noise comes from `generator` in the
    original's order: the start, then one tensor per step after that step's network call."""
    finite(conditioning, "the diffusion's conditioning")
    s = Schedule(steps)
    L, device = conditioning.shape[-1], conditioning.device
    x = torch.randn(1, N_MELS, L, generator=generator, device=device) * temperature
    for n, i in enumerate(reversed(range(s.steps))):
        eps, v = guided_eps(model, s, i, x, conditioning, guidance)
        noise = torch.randn(x.shape, generator=generator, device=device)
        x = ddpm_step(s, i, x, eps, v, noise)[0] if sampler == "ddpm" else ddim_step(s, i, x, eps, v, noise)[0]
        if progress:
            progress.diffusion(n, s.steps)
    return x


# ---------------------------------------------------------------------------------------------------
# UnivNet: a mel -> a waveform, 256 samples per frame
#
# Noise z [1, 64, frames] is lifted to 32 channels, then upsampled x8, x8, x4 by three blocks. In each, a
# transposed conv upsamples, and four dilated convs (1, 3, 9, 27) each feed a *location-variable*
# convolution: a kernel predictor reads the mel and emits, for every mel frame, a fresh 3-tap kernel and
# bias for the 256 / (8, 64, 256) samples under that frame, then a gated (sigmoid * tanh) residual. The
# original trains with weight norm; fold_weight_norm (Part III) folds w = g * v / |v| once, as speak.pt is
# read (|v| per output row, dim 0: per *input* channel for the transposed conv, whose weight is [in, out, k]).
# ---------------------------------------------------------------------------------------------------

LRELU = 0.2
VOCODER_STRIDES, VOCODER_DILATIONS, VOCODER_CHANNELS, VOCODER_NOISE = (8, 8, 4), (1, 3, 9, 27), 32, 64


def conv1d(cin, cout, k, dilation=1):
    """A 'same'-length convolution."""
    return nn.Conv1d(cin, cout, k, padding=(k - 1) // 2 * dilation, dilation=dilation)


class KernelPredictor(nn.Module):
    def __init__(self, channels, layers, hidden=64):
        super().__init__()
        self.layers, self.channels = layers, channels
        self.input_conv = conv1d(N_MELS, hidden, 5)
        self.residual_convs = nn.ModuleList(nn.ModuleList([conv1d(hidden, hidden, 3), conv1d(hidden, hidden, 3)])
                                            for _ in range(3))
        self.kernel_conv = conv1d(hidden, channels * 2 * channels * 3 * layers, 3)
        self.bias_conv = conv1d(hidden, 2 * channels * layers, 3)

    def forward(self, mel):                                           # mel: [B, 100, frames]
        c = F.leaky_relu(self.input_conv(mel), LRELU)
        for conv1, conv2 in self.residual_convs:
            c = c + F.leaky_relu(conv2(F.leaky_relu(conv1(c), LRELU)), LRELU)
        B, _, frames = c.shape                                        # per layer, per frame: [in, out, 3] and [out]
        kernels = self.kernel_conv(c).view(B, self.layers, self.channels, 2 * self.channels, 3, frames)
        return kernels, self.bias_conv(c).view(B, self.layers, 2 * self.channels, frames)


def location_variable_conv(x, kernel, bias, hop):
    """x [B, in, frames * hop], kernel [B, in, out, 3, frames], bias [B, out, frames] -> [B, out, frames * hop]:
    the samples under frame l convolved with frame l's own kernel (dilation 1: the original never passes another)."""
    windows = F.pad(x, (1, 1)).unfold(2, hop + 2, hop).unfold(3, 3, 1)        # [B, in, frames, hop, 3]
    out = torch.einsum("bilsk,biokl->bols", windows, kernel) + bias[..., None]  # [B, out, frames, hop]
    return out.reshape(out.shape[0], out.shape[1], -1)


class LVCBlock(nn.Module):
    def __init__(self, stride, hop, channels=VOCODER_CHANNELS):
        super().__init__()
        self.hop = hop
        self.kernel_predictor = KernelPredictor(channels, len(VOCODER_DILATIONS))
        self.convt_pre = nn.ConvTranspose1d(channels, channels, 2 * stride, stride=stride,
                                            padding=stride // 2 + stride % 2, output_padding=stride % 2)
        self.conv_blocks = nn.ModuleList(conv1d(channels, channels, 3, dilation=d) for d in VOCODER_DILATIONS)

    def forward(self, x, mel):                                        # x: [B, 32, T] -> [B, 32, T * stride]
        x = self.convt_pre(F.leaky_relu(x, LRELU))
        kernels, bias = self.kernel_predictor(mel)
        C = x.shape[1]
        for i, conv in enumerate(self.conv_blocks):
            h = F.leaky_relu(conv(F.leaky_relu(x, LRELU)), LRELU)
            out = location_variable_conv(h, kernels[:, i], bias[:, i], self.hop)          # [B, 64, T * stride]
            x = x + torch.sigmoid(out[:, :C]) * torch.tanh(out[:, C:])
        return x


class UnivNet(nn.Module):
    def __init__(self):
        super().__init__()
        hops = np.cumprod(VOCODER_STRIDES).tolist()                  # samples per mel frame after each block
        self.res_stack = nn.ModuleList(LVCBlock(s, h) for s, h in zip(VOCODER_STRIDES, hops))
        self.conv_pre = nn.Conv1d(VOCODER_NOISE, VOCODER_CHANNELS, 7, padding=3, padding_mode="reflect")
        self.conv_post = nn.Conv1d(VOCODER_CHANNELS, 1, 7, padding=3, padding_mode="reflect")

    def forward(self, mel, z):                                        # mel [B, 100, T], z [B, 64, T] -> [B, 1, 256 T]
        x = self.conv_pre(z)
        for block in self.res_stack:
            x = block(x, mel)
        return torch.tanh(self.conv_post(F.leaky_relu(x, LRELU)))

    def inference(self, mel, z):
        """The original's inference(): 10 quiet frames appended against an artifact at the end (z covers
        them too: [B, 64, T + 10]), their 2560 samples dropped again, clamped to [-1, 1]."""
        padded = torch.cat([mel, torch.full((mel.shape[0], N_MELS, 10), VOCODER_PAD, device=mel.device, dtype=mel.dtype)], 2)
        return self.forward(padded, z)[:, :, :-STFT_HOP * 10].clamp(-1, 1)


def denormalize(mel):
    """The sampler's [-1, 1] -> the log-mel range UnivNet was trained on."""
    return (mel + 1) / 2 * (MEL_MAX - MEL_MIN) + MEL_MIN


def vocode(vocoder, mel, generator=None):
    """mel [1, 100, L] in [-1, 1] -> wav [256 * L] at 24 kHz; z is the last draw of the stage."""
    finite(mel, "the diffusion's mel")
    z = torch.randn(1, VOCODER_NOISE, mel.shape[-1] + 10, generator=generator, device=mel.device)
    dtype = vocoder.conv_pre.weight.dtype                          # denormalised in fp32, then in the vocoder's dtype
    return vocoder.inference(denormalize(mel.float()).to(dtype), z.to(dtype))[0, 0]


# ---------------------------------------------------------------------------------------------------
# One line of text, spoken: the whole chain with its randomness pinned
# ---------------------------------------------------------------------------------------------------

@dataclass
class SpeakOptions:
    steps: int = 30
    guidance: float = 0.0
    temperature: float = 1.0
    sampler: str = "ddpm"
    seed: int | None = None


def diffusion_conditioning(model, diffusion, text_ids, mels, latent, codes):
    """Fixed codes [1, S] of one text -> the diffusion's conditioning [1, dim, L]: the AR latents of the codes
    before the calm run, with the diffusion voice latent [1, 2 * dim] through timestep_independent."""
    voice = model.voice_latent(mels)[None]                                                       # [1, D]
    latents = speech_latents(model, voice, text_ids[None], codes)[:, :calm_length(codes[0])].float()   # [1, S, D]
    finite(latents, "the AR latents")                                # the decoder overflowed (Part III)
    length = latents.shape[1] * 4 * SAMPLE_RATE // clvp.SAMPLE_RATE     # 4 mel frames of 22.05 kHz per code
    return diffusion.timestep_independent(latents.to(latent.dtype), latent, length)             # [1, dim, L]


@torch.inference_mode()
def speak(model, diffusion, vocoder, text_ids, mels, latent, codes, o: SpeakOptions, progress=None):
    """Fixed codes [1, S] of one text (S = 500 after Tortoise's padding) -> wav [samples] at 24 kHz. mels: the AR
    voice [C, 80, frames]; latent: the diffusion voice latent [1, 2 * dim]. The stage's generator is seeded with
    o.seed when it starts, so --codes with a seed replays the original's torch.manual_seed(seed) run.
    progress: None, or an object with stage(name), called as each stage starts, and diffusion(step, steps)."""
    if progress:
        progress.stage("latents")
    conditioning = diffusion_conditioning(model, diffusion, text_ids, mels, latent, codes)
    generator = torch.Generator(latent.device).manual_seed(o.seed) if o.seed is not None else None
    if progress:
        progress.stage("diffusion")
    mel = sample_mel(diffusion, conditioning, o.steps, o.guidance, o.temperature, o.sampler, generator, progress)
    if progress:
        progress.stage("vocoder")
    wav = vocode(vocoder, mel, generator).float()
    finite(wav, "the vocoder's waveform")
    return wav


# ===================================================================================================
# Part III: the boundaries. speak.pt, --codes and the options are checked whole before anything is built.
# ===================================================================================================

SPEAK_FORMAT, SPEAK_VERSION = "speak", 3      # 1: a torch.save pickle; 2: the original's nn.Sequential names
MAX_LAYERS, MAX_WIDTH = 1024, 16384
MAX_CODES_BYTES = 2**24                      # a [k, 500] int64 array is 4 kB per row


def finite(t, stage):
    """t, when every number in it is finite: each stage's output is checked before the next stage reads it,
    and the waveform before a sample is written (as 16-bit PCM a NaN would pass for -32768)."""
    clvp.require([(clvp.all_finite(t), f"{stage} overflowed (inf or NaN): the weights are too large for this "
                   "dtype (try --dtype float32, or check the checkpoints)")])
    return t


def check_speak_memory(config, tokens, guided, dtype, device):
    """Refuse, before any work, a line the audio stages cannot hold: `tokens` codes make L mel frames, and the
    diffusion's attention holds [rows, heads, L, L] scores (rows 2 when guided) a few times over while
    UnivNet holds about 0.6 MB per frame (measured: 1.5 and 1.1 GiB at L = 2176, 500 tokens, fp32)."""
    frames = tokens * 4 * SAMPLE_RATE // clvp.SAMPLE_RATE
    attention = 3 * (1 + guided) * config.heads * frames**2 * dtype.itemsize
    need = max(attention, frames * 600_000 * dtype.itemsize // 4)
    free = clvp.free_memory(device)
    clvp.require([(free is None or need <= 0.75 * free, f"a line of up to {tokens} speech tokens ({frames} mel frames) "
                   f"needs about {need / 2**30:.1f} GiB for the audio stages, more than 3/4 of the {(free or 0) / 2**30:.1f}"
                   f" GiB free: ask for fewer tokens (--max-tokens) or speak shorter lines")])


def default_speak_checkpoint():
    """Where speak.py looks for speak.pt by default: beside clvp.pt in the cache."""
    return os.path.join(os.path.dirname(clvp.default_checkpoint()), "speak.pt")


def diffusion_config(weights, latent_dim=None):
    """The DiffusionTts sizes read off its tensors: width from inp_block, depth from the layers that have
    attention, heads from the [32, heads] relative-bias tables (head width is not 64 everywhere: the voice
    embedder is twice as wide with as many heads) -> DiffusionConfig, or a CheckpointError."""
    def shape(name, dims):                                 # checked before any of it is indexed
        t = weights.get(name)
        clvp.require([(isinstance(t, torch.Tensor), f"diffusion: {name} missing")], clvp.CheckpointError)
        clvp.require([(t.dim() == dims, f"diffusion: {name} must have {dims} dimensions, not {list(t.shape)}")],
                     clvp.CheckpointError)
        return list(t.shape)
    bias = "layers.0.attn.relative_pos_embeddings.relative_attention_bias.weight"
    dim, heads = shape("inp_block.weight", 3)[0], shape(bias, 2)[1]
    layers = len({k.split(".")[1] for k in weights if k.startswith("layers.") and ".attn." in k})
    c = DiffusionConfig(dim, layers, heads, shape("latent_conv.weight", 3)[1])
    clvp.require([(1 <= c.layers <= MAX_LAYERS, f"diffusion: {c.layers} layers, not 1..{MAX_LAYERS}"),
                  (2 <= c.dim <= MAX_WIDTH and c.dim % 2 == 0, f"diffusion: width {c.dim}, not an even 2..{MAX_WIDTH}"),
                  (1 <= heads and c.dim % heads == 0, f"diffusion: {heads} heads do not divide the width {c.dim}"),
                  (latent_dim is None or c.latent_dim == latent_dim,
                   f"diffusion: reads {c.latent_dim}-wide AR latents, the decoder makes {latent_dim}")],
                 clvp.CheckpointError)
    return c


def fold_weight_norm(state, source="vocoder"):
    """{name.weight_g, name.weight_v} pairs -> name.weight = g * v / |v| (norm over all but dim 0)."""
    out = {k: v for k, v in state.items() if not k.endswith(("weight_g", "weight_v"))}
    for k in [k for k in state if k.endswith("weight_v")]:
        g, v = state.get(k[:-1] + "g"), state[k]
        clvp.require([(v.dim() >= 2, f"{source}: {k} must have 2 or more dimensions, not {list(v.shape)}")],
                     clvp.CheckpointError)
        clvp.require([(isinstance(g, torch.Tensor) and list(g.shape) == [v.shape[0]] + [1] * (v.dim() - 1),
                       f"{source}: {k[:-1]}g must be [{v.shape[0]}{', 1' * (v.dim() - 1)}] beside {k}")],
                     clvp.CheckpointError)
        out[k[:-2]] = v * (g / v.flatten(1).norm(dim=1).view_as(g))
    return out


def check_tensors(module_or_shapes, weights, source):
    """Every tensor present, of its shape, floating point, via clvp's weight check (on the meta device too)."""
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in module_or_shapes().state_dict().items()}
    clvp.check_weights(expected, weights, source)
    clvp.require([(t.is_floating_point(), f"{source}: {name} must hold floating-point numbers, not {t.dtype}")
                  for name, t in weights.items()], clvp.CheckpointError)


def check_speak_checkpoint(blob, latent_dim):
    """speak.pt's header -> (DiffusionConfig, diffusion weights, folded vocoder weights), or a CheckpointError.
    The tensors may still be on the meta device (read_tensor_file's first look); the numbers are checked
    once read."""
    clvp.require([(blob.get("format") == SPEAK_FORMAT,
                   "not a speak checkpoint (convert Tortoise's files with convert_weights.py)")], clvp.CheckpointError)
    clvp.require([(blob.get("version") == SPEAK_VERSION, f"speak checkpoint version {blob.get('version')!r}; "
                   f"this speak.py reads version {SPEAK_VERSION}" + (" (python convert_weights.py --upgrade PATH rewrites it)"
                   if blob.get("version") == 2 else ""))], clvp.CheckpointError)
    parts = [blob.get("diffusion"), blob.get("vocoder")]
    clvp.require([(isinstance(p, dict) and all(isinstance(v, torch.Tensor) and v.is_floating_point()
                                               for v in p.values()), f"{name}: not a group of floating-point tensors")
                  for name, p in zip(("diffusion", "vocoder"), parts)], clvp.CheckpointError)
    config = diffusion_config(parts[0], latent_dim)
    check_tensors(lambda: DiffusionTts(config), parts[0], "diffusion")
    vocoder = fold_weight_norm(parts[1])
    check_tensors(UnivNet, vocoder, "vocoder")
    return config, parts[0], vocoder


def checked_speak_checkpoint(blob, latent_dim):
    """speak.pt's contents once read -> check_speak_checkpoint's tuple, every number finite too. Reading and
    writing a speak.pt (convert_weights.py) both end here."""
    config, diffusion, vocoder = check_speak_checkpoint(blob, latent_dim)
    clvp.check_finite(diffusion, "diffusion")
    clvp.check_finite(vocoder, "vocoder")
    return config, diffusion, vocoder


def read_speak_checkpoint(path, latent_dim):
    """speak.pt -> (DiffusionConfig, diffusion weights, folded vocoder weights), checked, numbers included."""
    blob = clvp.read_tensor_file(path, lambda blob: check_speak_checkpoint(blob, latent_dim))
    with clvp.prefixed(f"{path}: ", clvp.CheckpointError):
        return checked_speak_checkpoint(blob, latent_dim)


def load_speak(path, device, latent_dim, dtype=torch.float32):
    """speak.pt -> (DiffusionTts, UnivNet) in eval mode, in dtype, on device; validated before building."""
    config, diffusion_weights, vocoder_weights = read_speak_checkpoint(path, latent_dim)
    with torch.device("meta"):
        diffusion, vocoder = DiffusionTts(config), UnivNet()
    diffusion.load_state_dict(diffusion_weights, assign=True)
    vocoder.load_state_dict(vocoder_weights, assign=True)
    return diffusion.to(device, dtype).eval(), vocoder.to(device, dtype).eval()


def random_speak(config, device, dtype=torch.float32):
    """--random-init: random models (every DiffusionTts parameter perturbed, as the original zero-inits some)."""
    torch.manual_seed(0)
    diffusion, vocoder = DiffusionTts(config), UnivNet()
    with torch.no_grad():
        for p in diffusion.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return diffusion.to(device, dtype).eval(), vocoder.to(device, dtype).eval()


def read_codes(path, stop_token):
    """--codes FILE.npy: clvp.py's [k, T] tokens (T <= 500); the first row (the best) stop-padded to 500 and
    fixed, as Tortoise fixes candidates -> [1, 500] long. The header's shape and dtype are checked against
    the file's size before numpy allocates anything by them."""
    npy = np.lib.format
    with clvp.open_input(path, clvp.UsageError) as f, clvp.prefixed(f"--codes {path}: ", clvp.UsageError):
        size = os.fstat(f.fileno()).st_size
        clvp.require([(size <= MAX_CODES_BYTES, f"larger than {MAX_CODES_BYTES >> 20} MiB")])
        try:
            version = npy.read_magic(f)
            shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
        except (ValueError, OSError, EOFError) as e:
            raise clvp.InputError(f"not a .npy array ({clvp.first_line(e)})") from None
        clvp.require([(version in ((1, 0), (2, 0), (3, 0)), f"not a .npy array (format version {version})")])
        clvp.require([(len(shape) == 2 and all(type(n) is int for n in shape) and shape[0] >= 1 and
                       1 <= shape[1] <= 500 and dtype.kind in "iu",
                       f"must be integer tokens [k, 1..500], not {dtype} {list(shape)}")])
        clvp.require([(f.tell() + math.prod(shape) * dtype.itemsize == size,
                       f"its header says {dtype} {list(shape)}, but the file holds {size} bytes")])
        f.seek(0)
        try:
            codes = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise clvp.InputError(f"not a .npy array ({clvp.first_line(e)})") from None
        clvp.require([(0 <= codes.min() and codes.max() <= stop_token, f"tokens must be in 0..{stop_token}")])
    return clvp.fix_candidates(torch.from_numpy(codes[:1].astype(np.int64)), stop_token, 500)[0]


def speak_options(args):
    """The preset with --diffusion-steps / --guidance over it -> SpeakOptions, or a UsageError."""
    steps, guidance = PRESETS[args.preset]
    steps = steps if args.diffusion_steps is None else args.diffusion_steps
    guidance = guidance if args.guidance is None else args.guidance
    clvp.require([clvp.within("--diffusion-steps", steps, 2, TRAINED_STEPS),     # the original's schedule needs 2
                  (math.isfinite(guidance) and 0 <= guidance <= 100, f"--guidance must be in 0..100, not {guidance}"),
                  (math.isfinite(args.diffusion_temperature) and 0 <= args.diffusion_temperature <= 100,
                   f"--diffusion-temperature must be in 0..100, not {args.diffusion_temperature}"),
                  (args.keep == 1, "--keep: speak.py speaks the best candidate only"),
                  (args.pad_to_max, "--no-pad: speak.py pads candidates as Tortoise does"),
                  (not args.explain, "--explain is clvp.py's; speak.py shows its stages with the progress display")])
    return SpeakOptions(steps, float(guidance), args.diffusion_temperature, args.sampler, args.seed)


# ===================================================================================================
# Part IV: the command line. python speak.py --text "..." --audio voice.wav --out speech.wav
# ===================================================================================================

RANDOM_TOKENS = 40                  # codes per candidate with --random-init unless --max-tokens says (about 2 s)
RIFF_BYTES = 2**32 - 2**16          # a RIFF WAV's sizes are 32-bit: 4 GiB is 12.4 h of float32 at 24 kHz


def wav_container(lines, tokens, pcm16):
    """'WAV', or 'RF64' where `lines` lines of up to `tokens` codes could pass RIFF's 4 GiB (a 1 MiB text file
    can: about 18 h). RF64 is the same WAV with 64-bit sizes, which libsndfile, sox and ffmpeg read."""
    samples = lines * (tokens * 4 * SAMPLE_RATE // clvp.SAMPLE_RATE) * 256
    return "RF64" if samples * (2 if pcm16 else 4) > RIFF_BYTES else "WAV"


def build_parser():
    p = clvp.build_parser()                                  # text, voice, checkpoint, sampling, device, output
    p.prog, p.description = "speak.py", "Speak a text in a reference voice with Tortoise: clvp.py's ranked " \
                                         "candidates through the diffusion decoder and UnivNet to a 24 kHz WAV."
    p.set_defaults(out="speech.wav", max_new_tokens=None)   # None: 500, or RANDOM_TOKENS with --random-init
    g = p.add_argument_group("audio")
    g.add_argument("--speak-checkpoint", help="converted diffusion decoder + vocoder (default: speak.pt beside clvp.pt)")
    g.add_argument("--codes", metavar="FILE.npy", help="speak these tokens (clvp.py's output; its first row) "
                   "instead of sampling candidates")
    g.add_argument("--preset", choices=list(PRESETS), default="ultra_fast", help="Tortoise's presets (default ultra_fast: "
                   "30 steps, no guidance)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    g.add_argument("--diffusion-steps", type=int, help="override the preset's steps")
    g.add_argument("--guidance", type=float, help="conditioning-free guidance weight (0: off)")
    g.add_argument("--diffusion-temperature", type=float, default=1.0)
    g.add_argument("--pcm16", action="store_true", help="write 16-bit PCM instead of 32-bit float")
    return p


def prepare(args):
    """Everything checked before any work -> (device, decoding options, speak options, model, diffusion,
    vocoder, texts, ids, codes or None)."""
    if args.max_new_tokens is None:      # random weights never stop: 500 codes would be 23 s of noise to make
        args.max_new_tokens = RANDOM_TOKENS if args.random_init else clvp.DecodingOptions.max_new_tokens
    device, decoding = clvp.check_args(args)
    options = speak_options(args)
    texts = clvp.read_texts(args)
    speak_path = None if args.random_init else args.speak_checkpoint or default_speak_checkpoint()
    inputs = [*args.audio, args.text_file, args.codes, speak_path,
              None if args.random_init else args.checkpoint or clvp.default_checkpoint()]
    with clvp.prefixed("--out ", clvp.UsageError):
        clvp.check_output(args.out, [i for i in inputs if i])
    for path in args.audio:
        clvp.check_input_file(path, clvp.AudioError)
    codes = read_codes(args.codes, clvp.DecoderConfig().stop_token) if args.codes else None
    if not args.random_init and args.speak_checkpoint is None and not os.path.exists(speak_path):
        raise clvp.UsageError(f"no speak checkpoint at {speak_path}: run `python convert_weights.py --download "
                              "--speak` to fetch and convert Tortoise's diffusion_decoder.pth and vocoder.pth, or "
                              "pass --speak-checkpoint PATH")
    model = clvp.prepare_model(args, device)
    clvp.check_options(decoding, model.config, clvp.flag)
    if args.random_init:
        tiny = DiffusionConfig(dim=64, layers=2, heads=2, latent_dim=model.config.decoder.dim)
        diffusion, vocoder = random_speak(tiny if args.tiny else DiffusionConfig(), device, getattr(torch, args.dtype))
    else:
        diffusion, vocoder = load_speak(speak_path, device, model.config.decoder.dim, getattr(torch, args.dtype))
    ids = [clvp.encode_text(model, t) for t in texts]
    if codes is None:
        clvp.check_memory(model, max(len(i) for i in ids), decoding)
    check_speak_memory(diffusion.config, decoding.max_new_tokens if codes is None else calm_length(codes),
                       options.guidance > 0, getattr(torch, args.dtype), device)
    return device, decoding, options, model, diffusion, vocoder, texts, ids, codes


class SpeakProgress(clvp.Progress):
    """clvp.py's progress line, with speak()'s stages; it adds each stage's seconds to times[stage]."""

    def __init__(self, enabled, times, options):
        super().__init__(enabled)
        self.times, self.options, self.current = times, options, None

    def stage(self, name):
        """name starts (None: the last one ends)."""
        now = time.perf_counter()
        if self.current:
            self.times[self.current] += now - self.began
        self.current, self.began = name, now
        self.show(name or "")

    def diffusion(self, step, steps):
        o = self.options
        self.show(f"diffusion: step {step + 1}/{steps} ({o.sampler}{f', guidance {o.guidance:g}' if o.guidance else ''})")


def run(args):
    device, decoding, options, model, diffusion, vocoder, texts, ids, codes = prepare(args)
    quiet = args.quiet or args.json or not sys.stderr.isatty()
    if args.random_init and not args.json:
        print("NOTE: --random-init: the weights are random, so the audio is noise; this run only shows every "
              f"stage working (on {args.max_new_tokens} speech tokens per candidate).")
    mels = clvp.voice_mels(model, args.audio)
    dtype = diffusion.unconditioned_embedding.dtype
    latent = diffusion.diffusion_latent(diffusion_voice_mels(args.audio, device).to(dtype))   # [1, 2 * dim], once
    finite(latent, "the diffusion's voice latent")
    times, samples = {"decoding": 0.0, "latents": 0.0, "diffusion": 0.0, "vocoder": 0.0}, 0
    container = wav_container(len(ids), decoding.max_new_tokens if codes is None else calm_length(codes), args.pcm16)

    def write(f):            # --text-file: the lines joined, as read.py does, each written as soon as it is made,
        nonlocal samples     # so memory holds one line's audio, never the whole file's
        with soundfile.SoundFile(f, "w", SAMPLE_RATE, 1, "PCM_16" if args.pcm16 else "FLOAT", format=container) as wav:
            for text_ids in ids:
                progress = SpeakProgress(not quiet, times, options)
                progress.stage("decoding")
                best = codes if codes is not None else model.generate(text_ids, mels, decoding, progress).best
                part = speak(model, diffusion, vocoder, text_ids, mels, latent, best.to(device), options, progress)
                progress.stage(None)
                wav.write(part.cpu().numpy())
                samples += len(part)
    try:
        clvp.write_atomically(args.out, write)
    except OSError as e:
        raise clvp.UsageError(f"{args.out}: cannot write it ({e.strerror or clvp.first_line(e)})") from None
    seconds = samples / SAMPLE_RATE
    if args.json:
        print(json.dumps(dict(out=args.out, sample_rate=SAMPLE_RATE, seconds=round(seconds, 4), lines=len(texts),
                              random_init=args.random_init, stages={k: round(v, 3) for k, v in times.items()})))
    else:
        print(f"{seconds:.2f} s of audio at {SAMPLE_RATE} Hz written to {args.out} "
              f"(decoding {times['decoding']:.1f} s, diffusion {times['diffusion']:.1f} s, vocoder {times['vocoder']:.1f} s)")
    return 0


def main(argv=None):
    return clvp.run_command("speak.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
