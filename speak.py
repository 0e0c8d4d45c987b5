"""speak.py: Tortoise's last stages, speech tokens -> 24 kHz audio, in one file beside clvp.py.

clvp.py ends with the speech tokens CLVP picked. Tortoise turns them into audio in two more networks:

    best tokens [1, 500] --Decoder (teacher-forced, training positions)--> AR latents [1, 500, 1024]
        --calm-token trim--> [1, S, 1024]
    voice.wav --resample 24 kHz--> --100-band log-mel--> --contextual embedder--> diffusion voice latent [1, 2048]
    [AR latents, voice latent] --timestep_independent--> conditioning [1, 1024, L]      (L = S * 4 * 24000 // 22050)
    noise [1, 100, L] --DiffusionTts, N respaced DDPM (or DDIM) steps--> mel [1, 100, L] in [-1, 1]
        --denormalise--> log-mel --UnivNet--> wav [1, 1, 256 * L] at 24 kHz

tortoise-tts 3.0's fast path (api_fast.py) skips the diffusion: HiFi-GAN reads the AR latents themselves,

    one sampled candidate --Decoder (teacher-forced)--> AR latents [1, S, 1024] --stretch--> [1, 1024, L]
        --HiFi-GAN, with the decoder's voice latent--> wav [1, 1, 256 * L] at 24 kHz

and can stream: the latents of the sampling pass itself, decoded every 40 tokens, crossfaded chunk to chunk.

Its parts are numbered as clvp.py's: Part I is the lesson, in that order; Part III checks what comes in
(speak.pt, hifigan.pt, --codes, the options) before any work; Part IV is the command line. There is no
Part II: the audio stages run as the lesson writes them (their speed ideas, the position bias read as a
view of one row and the stream's steps on clvp.py's packed weights, are each a line). It imports clvp for
everything before the tokens (text, audio loading, the decoder, generation and ranking) and for its
boundary helpers; clvp.py imports nothing of this file. Numbers match the original Tortoise code on the
same weights (test_tortoise.py).
"""
import contextlib
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
    return dec.latent(h[:, prompt.shape[1] - 1:])                                        # and 8193 change nothing


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
# The fast path (tortoise 3.0's api_fast.py): HiFi-GAN reads the AR latents themselves
#
# No diffusion, no 100-band mel, no UnivNet: a HiFi-GAN generator (the original's models/hifigan_decoder.py,
# from coqui's TTS, after Kong et al.) was trained to turn the decoder's latents [1, S, 1024] straight into
# 24 kHz audio. A code stands for 1024 samples at 22.05 kHz, four mel frames of 256, so the latents are first
# stretched linearly x4, then x24000/22050 to frames of 256 samples at 24 kHz: L = floor(floor(4 S) * 24000 / 22050).
# The generator: a 7-tap conv 1024 -> 512, plus the decoder's voice latent through a 1x1 conv (one vector
# added at every frame); four stages, each a leaky ReLU, a transposed conv that upsamples x8, x8, x2, x2
# (256 samples per frame in all) and halves the channels (512 -> 32), then the mean of three residual blocks
# with kernels 3, 7 and 11 (HiFi-GAN's multi-receptive-field fusion: each block dilates 1, 3, 5); then a
# leaky ReLU, a 7-tap conv to one channel and tanh. Quirk: every leaky ReLU has slope 0.1 but the last, which
# has torch's default 0.01, as in HiFi-GAN's own code. The weight norm it was trained with is folded when
# convert_weights.py writes hifigan.pt, so these are plain convolutions.
# ---------------------------------------------------------------------------------------------------

HIFI_SLOPE = 0.1
HIFI_UPSAMPLE, HIFI_KERNELS, HIFI_DILATIONS, HIFI_CHANNELS = (8, 8, 2, 2), (3, 7, 11), (1, 3, 5), 512


class HifiResBlock(nn.Module):
    def __init__(self, channels, kernel):
        super().__init__()
        self.convs1 = nn.ModuleList(conv1d(channels, channels, kernel, dilation=d) for d in HIFI_DILATIONS)
        self.convs2 = nn.ModuleList(conv1d(channels, channels, kernel) for _ in HIFI_DILATIONS)

    def forward(self, x):                                             # [B, C, T] -> [B, C, T]
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, HIFI_SLOPE)), HIFI_SLOPE))
        return x


class HifiGan(nn.Module):
    def __init__(self, latent_dim=1024, channels=HIFI_CHANNELS):
        super().__init__()
        self.conv_pre = nn.Conv1d(latent_dim, channels, 7, padding=3)
        self.cond_layer = nn.Conv1d(latent_dim, channels, 1)
        self.ups = nn.ModuleList(nn.ConvTranspose1d(channels >> i, channels >> (i + 1), 2 * u, u, padding=u // 2)
                                 for i, u in enumerate(HIFI_UPSAMPLE))
        self.resblocks = nn.ModuleList(HifiResBlock(channels >> (i + 1), k)
                                       for i in range(len(HIFI_UPSAMPLE)) for k in HIFI_KERNELS)
        self.conv_post = nn.Conv1d(channels >> len(HIFI_UPSAMPLE), 1, 7, padding=3)

    def forward(self, x, voice):             # frames [B, latent_dim, L], voice [B, latent_dim] -> [B, 1, 256 L]
        x = self.conv_pre(x) + self.cond_layer(voice[:, :, None])
        n = len(HIFI_KERNELS)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, HIFI_SLOPE))                       # [B, C / 2, T * u]
            x = sum(block(x) for block in self.resblocks[i * n:(i + 1) * n]) / n
        return torch.tanh(self.conv_post(F.leaky_relu(x)))             # slope 0.01: the quirk above


def stretch(latents):
    """AR latents [B, S, D] -> frames [B, D, L] at 24 kHz, as the original's inference() stretches them."""
    x = F.interpolate(latents.transpose(1, 2), scale_factor=4, mode="linear")             # [B, D, 4 S]
    return F.interpolate(x, scale_factor=SAMPLE_RATE / clvp.SAMPLE_RATE, mode="linear")   # [B, D, L]


def hifigan_decode(hifigan, latents, voice):
    """AR latents [1, S, D] and the decoder's voice latent [1, D] -> wav [256 * L] at 24 kHz."""
    dtype = hifigan.conv_pre.weight.dtype
    return hifigan(stretch(finite(latents, "the AR latents").to(dtype)), voice.to(dtype))[0, 0]


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


def diffusion_conditioning(model, diffusion, text_ids, voice, latent, codes):
    """Fixed codes [1, S] of one text, the decoder's voice latent [1, D] -> the diffusion's conditioning [1, dim,
    L]: the AR latents of the codes before the calm run, with the diffusion voice latent [1, 2 * dim] through
    timestep_independent."""
    latents = speech_latents(model, voice, text_ids[None], codes)[:, :calm_length(codes[0])].float()   # [1, S, D]
    finite(latents, "the AR latents")                                # the decoder overflowed (Part III)
    length = latents.shape[1] * 4 * SAMPLE_RATE // clvp.SAMPLE_RATE     # 4 mel frames of 22.05 kHz per code
    return diffusion.timestep_independent(latents.to(latent.dtype), latent, length)             # [1, dim, L]


@torch.inference_mode()
def speak(model, diffusion, vocoder, text_ids, voice, latent, codes, o: SpeakOptions, progress=None):
    """Fixed codes [1, S] of one text (S = 500 after Tortoise's padding) -> wav [samples] at 24 kHz. voice: the
    decoder's voice latent [1, D]; latent: the diffusion voice latent [1, 2 * dim]. The stage's generator is seeded with
    o.seed when it starts, so --codes with a seed replays the original's torch.manual_seed(seed) run.
    progress: None, or an object with stage(name), called as each stage starts, and diffusion(step, steps)."""
    if progress:
        progress.stage("latents")
    conditioning = diffusion_conditioning(model, diffusion, text_ids, voice, latent, codes)
    generator = torch.Generator(latent.device).manual_seed(o.seed) if o.seed is not None else None
    if progress:
        progress.stage("diffusion")
    mel = sample_mel(diffusion, conditioning, o.steps, o.guidance, o.temperature, o.sampler, generator, progress)
    if progress:
        progress.stage("vocoder")
    wav = vocode(vocoder, mel, generator).float()
    finite(wav, "the vocoder's waveform")
    return wav


# ---------------------------------------------------------------------------------------------------
# One line of text, the fast way (api_fast.py's tts): one sample, its latents, HiFi-GAN
#
# api_fast's tts() samples one candidate (top-k 50 on top of api.py's sampling), takes its latents from a
# second, teacher-forced pass, as the diffusion path does (speech_latents), and hands them to HiFi-GAN. It
# neither fixes the codes nor trims the calm run: the codes are spoken as inference_speech returned them,
# through the stop token (whose latent is the last code's hidden state). With more than one candidate,
# clvp.py ranks them first and the best is spoken, which no fast path of the original does.
# ---------------------------------------------------------------------------------------------------

def spoken_codes(gen, options, stop_token):
    """The best candidate of a Generation as inference_speech returned it -> [S]: the codes before its stop
    token, then the stop token, unless it never stopped (the fix replaced the stop and what follows)."""
    length, stop = int(gen.lengths[gen.order[0]]), gen.best.new_tensor([stop_token])
    return torch.cat([gen.best[0, :length], stop if length < options.max_new_tokens else stop[:0]])


@torch.inference_mode()
def speak_fast(model, hifigan, text_ids, voice, codes):
    """Codes [S] of one text, as spoken_codes gives them, and the decoder's voice latent [1, D] -> wav [samples]
    at 24 kHz."""
    return hifigan_decode(hifigan, speech_latents(model, voice, text_ids[None], codes[None]), voice).float()


# ---------------------------------------------------------------------------------------------------
# Streaming (api_fast.py's tts_stream): audio while the decoder is still sampling
#
# The stream takes its latents from the sampling pass itself: for each token, the decoder's final-normed
# hidden state at the input that produced it (the start token's for the first), at the positions the cached
# generation uses (speech position k + 1 for the k-th token: clvp.py's position quirk), so they differ a
# little from the teacher-forced ones above. After the first 60 tokens, then every 40, HiFi-GAN decodes *all*
# the latents so far (its convolutions need context on both sides: decoding only the new ones would click
# at each seam) and the stream plays what it has not played yet, except the last 1024 samples: the next
# decode remakes them with more context to their right, and its first 1024 samples are crossfaded with them
# by linear ramps (handle_chunks, from coqui's XTTS). Two things differ from the original, at the end only:
# it never plays its last 1024 samples, and it crashes when the last decode adds fewer than 1024 samples
# (coqui TTS PR 3160 fixed the same in XTTS); here the last chunk is everything not yet played.
# ---------------------------------------------------------------------------------------------------

STREAM_FIRST, STREAM_EVERY, STREAM_OVERLAP = 60, 40, 1024


class Crossfade:
    """Successive decodes of all the latents so far -> the chunks to play, each crossfaded into the last."""

    def __init__(self, overlap=STREAM_OVERLAP):
        self.overlap, self.played, self.tail = overlap, 0, None

    def chunk(self, wav, last=False):
        """wav [samples], the newest decode -> the samples to play now: from where the previous chunk stopped
        (its held-back tail) to the end, less a new held-back tail unless this is the last."""
        piece = wav[max(self.played - self.overlap, 0):len(wav) if last else len(wav) - self.overlap].clone()
        if self.tail is not None:
            n = self.overlap
            piece[:n] = self.tail * torch.linspace(1.0, 0.0, n, device=wav.device) + \
                piece[:n] * torch.linspace(0.0, 1.0, n, device=wav.device)
        self.played, self.tail = len(wav), wav[-self.overlap:]
        return piece


@torch.inference_mode()
def stream(model, hifigan, text_ids, voice, options, codes=None):
    """One text, the decoder's voice latent [1, D] -> wav chunks [samples] at 24 kHz as they are made: sampled
    with `options`, one token at a time
    through a one-row KV cache, or, with codes [S], these tokens in place of sampled ones (a stream replayed).
    The steps run on clvp.py's engine's packed weights unless options.engine is "lesson": at one row a step is
    a matrix-vector product per weight, bound by memory bandwidth (official size, fp32: 84 ms a step packed,
    148 ms plain, against a floor of 71 ms for its 1.47 GB at 21.7 GB/s, on an AVX2 EPYC)."""
    dec, c = model.decoder, model.decoder.config
    prompt = dec.prompt(voice, text_ids[None])                                                   # [1, P, D]
    P, steps = prompt.shape[1], options.max_new_tokens if codes is None else len(codes)
    cache = clvp.KVCache.empty(c, 1, P + steps, prompt.device, prompt.dtype)
    generator = torch.Generator(prompt.device).manual_seed(options.seed) if options.seed is not None else None
    seen = torch.zeros(1, c.speech_vocab_size, dtype=torch.bool, device=prompt.device)
    seen[:, c.start_token] = True
    latents, fade, decoded = [], Crossfade(), 0
    with clvp.packed_weights(dec, 1) if options.engine == "fast" else contextlib.nullcontext():
        h = dec(prompt, cache)[:, -1]                               # the start token's hidden state [1, D]
        for k in range(steps):
            latents.append(dec.latent(h))                           # the latent of the token drawn next
            if codes is None:
                logits = dec.head(latents[-1]).float()              # drawn as clvp.decode draws, for one row
                clvp.check_overflow(logits)
                logits[:, c.start_token] = -math.inf
                token = clvp.next_tokens(logits, seen, options, generator)
                seen[:, token] = True
            else:
                token = codes[k:k + 1]
            last = int(token) == c.stop_token or k == steps - 1
            if last or len(latents) - decoded >= (STREAM_EVERY if decoded else STREAM_FIRST):
                yield fade.chunk(hifigan_decode(hifigan, torch.cat(latents)[None], voice).float(), last)
                decoded = len(latents)
            if last:
                return
            h = dec(dec.embed_speech(token[:, None], clvp.speech_position(k + 1)), cache, P + k)[:, -1]


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


HIFIGAN_FORMAT, HIFIGAN_VERSION = "hifigan", 1


def default_hifigan_checkpoint():
    """Where speak.py looks for hifigan.pt by default: beside clvp.pt in the cache."""
    return os.path.join(os.path.dirname(clvp.default_checkpoint()), "hifigan.pt")


def hifigan_sizes(weights, latent_dim=None):
    """(latent_dim, channels) read off conv_pre's [channels, latent_dim, 7], checked -> or a CheckpointError."""
    t = weights.get("conv_pre.weight")
    clvp.require([(isinstance(t, torch.Tensor) and t.dim() == 3, "hifigan: conv_pre.weight missing, or not "
                   "[channels, latent_dim, 7]")], clvp.CheckpointError)
    channels, width = t.shape[:2]
    step = 2 ** len(HIFI_UPSAMPLE)                   # the channels halve at each upsampling
    clvp.require([(step <= channels <= MAX_WIDTH and channels % step == 0,
                   f"hifigan: {channels} channels, not a multiple of {step} in {step}..{MAX_WIDTH}"),
                  (1 <= width <= MAX_WIDTH, f"hifigan: reads {width}-wide latents, not 1..{MAX_WIDTH}"),
                  (latent_dim is None or width == latent_dim,
                   f"hifigan: reads {width}-wide AR latents, the decoder makes {latent_dim}")], clvp.CheckpointError)
    return width, channels


def check_hifigan_checkpoint(blob, latent_dim):
    """hifigan.pt's header -> its weights (tensors possibly still on the meta device), or a CheckpointError."""
    clvp.require([(blob.get("format") == HIFIGAN_FORMAT, "not a hifigan checkpoint (convert Tortoise's "
                   "hifidecoder.pth with convert_weights.py --tortoise-hifigan)"),
                  (blob.get("version") == HIFIGAN_VERSION, f"hifigan checkpoint version {blob.get('version')!r}; "
                   f"this speak.py reads version {HIFIGAN_VERSION}")], clvp.CheckpointError)
    weights = blob.get("hifigan")
    clvp.require([(isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values()),
                   "hifigan: not a group of tensors")], clvp.CheckpointError)
    sizes = hifigan_sizes(weights, latent_dim)
    check_tensors(lambda: HifiGan(*sizes), weights, "hifigan")
    return weights


def checked_hifigan_checkpoint(blob, latent_dim):
    """hifigan.pt's contents once read -> its weights, every number finite too (speak.py and the converter)."""
    weights = check_hifigan_checkpoint(blob, latent_dim)
    clvp.check_finite(weights, "hifigan")
    return weights


def load_hifigan(path, device, latent_dim, dtype=torch.float32):
    """hifigan.pt -> HifiGan in eval mode, in dtype, on device; validated before building."""
    blob = clvp.read_tensor_file(path, lambda blob: check_hifigan_checkpoint(blob, latent_dim))
    with clvp.prefixed(f"{path}: ", clvp.CheckpointError):
        weights = checked_hifigan_checkpoint(blob, latent_dim)
    with torch.device("meta"):
        hifigan = HifiGan(*hifigan_sizes(weights))
    hifigan.load_state_dict(weights, assign=True)
    return hifigan.to(device, dtype).eval()


def random_speak(config, device, dtype=torch.float32):
    """--random-init: random models (every DiffusionTts parameter perturbed, as the original zero-inits some)."""
    torch.manual_seed(0)
    diffusion, vocoder = DiffusionTts(config), UnivNet()
    with torch.no_grad():
        for p in diffusion.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return diffusion.to(device, dtype).eval(), vocoder.to(device, dtype).eval()


def read_codes(path, stop_token):
    """--codes FILE.npy: clvp.py's [k, T] tokens (T <= 500) -> the first row (the best) [T] long. The header's
    shape and dtype are checked against the file's size before numpy allocates anything by them."""
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
    return torch.from_numpy(codes[0].astype(np.int64))


def codes_as_spoken(row, stop_token, decoder):
    """--codes' row [T] -> what the decoder speaks. diffusion: [1, 500], stop-padded and fixed as api.py fixes a
    candidate. hifigan: [S] as inference_speech returns a sample (through its first stop token), or, for a row
    without one (clvp.py writes fixed rows), up to the calm run, where api.py cuts fixed codes."""
    if decoder == "diffusion":
        return clvp.fix_candidates(row[None], stop_token, 500)[0]
    stops = (row == stop_token).nonzero()
    return row[:int(stops[0]) + 1] if len(stops) else row[:calm_length(row)]


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
        "candidates through the diffusion decoder and UnivNet (api.py), or straight through HiFi-GAN (api_fast.py), " \
        "to 24 kHz audio."
    p.set_defaults(out="speech.wav", max_new_tokens=None, num_candidates=None)   # None: each decoder's own default
    g = p.add_argument_group("audio")
    g.add_argument("--decoder", choices=["diffusion", "hifigan"], default="diffusion", help="diffusion: api.py's "
                   "diffusion decoder and UnivNet (default); hifigan: api_fast.py's HiFi-GAN, from the decoder's "
                   "latents (1 candidate unless --candidates says more)")
    g.add_argument("--stream", action="store_true", help="with --decoder hifigan: audio as it is sampled, a chunk "
                   "after the first 60 tokens and every 40 after (api_fast.py's tts_stream); one candidate")
    g.add_argument("--speak-checkpoint", help="converted diffusion decoder + vocoder (default: speak.pt beside clvp.pt)")
    g.add_argument("--hifigan-checkpoint", help="converted HiFi-GAN decoder (default: hifigan.pt beside clvp.pt)")
    g.add_argument("--codes", metavar="FILE.npy", help="speak these tokens (clvp.py's output; its first row) "
                   "instead of sampling candidates")
    g.add_argument("--preset", choices=list(PRESETS), default="ultra_fast", help="Tortoise's presets (default ultra_fast: "
                   "30 steps, no guidance)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    g.add_argument("--diffusion-steps", type=int, help="override the preset's steps")
    g.add_argument("--guidance", type=float, help="conditioning-free guidance weight (0: off)")
    g.add_argument("--diffusion-temperature", type=float, default=1.0)
    g.add_argument("--pcm16", action="store_true", help="write 16-bit PCM instead of 32-bit float")
    p.epilog = "--out - writes raw 16-bit little-endian mono PCM at 24 kHz to standard output, for a player: " \
               "python speak.py ... --decoder hifigan --stream --out - | aplay -f S16_LE -r 24000 -c 1"
    return p


def check_speak_args(args):
    """speak.py's own rules on top of clvp.py's, and each decoder's defaults."""
    fast = args.decoder == "hifigan"
    if args.max_new_tokens is None:      # random weights never stop: 500 codes would be 23 s of noise to make
        args.max_new_tokens = RANDOM_TOKENS if args.random_init else clvp.DecodingOptions.max_new_tokens
    if args.num_candidates is None:
        args.num_candidates = 1 if fast else clvp.DecodingOptions.num_candidates
    clvp.require([(fast or not args.stream, "--stream needs --decoder hifigan (the diffusion decoder needs the "
                   "whole candidate)"),
                  (not args.stream or args.num_candidates == 1, "--stream speaks as it samples: one candidate "
                   "(--candidates 1), nothing to rank"),
                  (not args.stream or args.cache_dtype is None, "--cache-dtype sets the engine's batched cache; "
                   "--stream decodes one row through a cache in the model's dtype"),
                  (fast or not args.hifigan_checkpoint, "--hifigan-checkpoint needs --decoder hifigan"),
                  (not (args.out == "-" and args.json), "--json and --out - both write to standard output"),
                  (not (args.out == "-" and args.pcm16), "--out - is 16-bit PCM already; --pcm16 is for a WAV"),
                  (args.out != "-" or sys.stdout is not None, "--out -: standard output is closed"),
                  (args.out != "-" or sys.stdout is None or not sys.stdout.isatty(), "--out - writes raw 16-bit PCM "
                   "to standard output, which is a terminal here: pipe it into a player (| aplay -f S16_LE -r 24000 -c 1)")],
                 clvp.UsageError)


def prepare(args):
    """Everything checked before any work -> (device, decoding options, speak options, model, the audio stages,
    texts, ids, codes or None). The audio stages: (diffusion, vocoder), or (hifigan,) for --decoder hifigan."""
    check_speak_args(args)
    device, decoding = clvp.check_args(args)
    options = speak_options(args)
    texts = clvp.read_texts(args)
    fast = args.decoder == "hifigan"
    default = default_hifigan_checkpoint() if fast else default_speak_checkpoint()
    stage_path = None if args.random_init else (args.hifigan_checkpoint if fast else args.speak_checkpoint) or default
    inputs = [*args.audio, args.text_file, args.codes, stage_path,
              None if args.random_init else args.checkpoint or clvp.default_checkpoint()]
    if args.out != "-":
        with clvp.prefixed("--out ", clvp.UsageError):
            clvp.check_output(args.out, [i for i in inputs if i])
    for path in args.audio:
        clvp.check_input_file(path, clvp.AudioError)
    codes = read_codes(args.codes, clvp.DecoderConfig().stop_token) if args.codes else None
    if not args.random_init and stage_path == default and not os.path.exists(stage_path):
        fetch = "--fast` to fetch and convert tortoise 3.0's hifidecoder.pth" if fast else \
            "--speak` to fetch and convert Tortoise's diffusion_decoder.pth and vocoder.pth"
        raise clvp.UsageError(f"no {'hifigan' if fast else 'speak'} checkpoint at {stage_path}: run `python "
                              f"convert_weights.py --download {fetch}, or pass --{'hifigan' if fast else 'speak'}"
                              "-checkpoint PATH")
    model = clvp.prepare_model(args, device)
    clvp.check_options(decoding, model.config, clvp.flag)
    dtype = getattr(torch, args.dtype)
    stages = load_stages(args, model, stage_path, device, dtype)
    ids = [clvp.encode_text(model, t) for t in texts]
    if codes is not None:
        codes = codes_as_spoken(codes, model.config.decoder.stop_token, args.decoder)
    elif not args.stream:
        clvp.check_memory(model, max(len(i) for i in ids), decoding)
    if not fast:
        check_speak_memory(stages[0].config, decoding.max_new_tokens if codes is None else calm_length(codes[0]),
                           options.guidance > 0, dtype, device)
    return device, decoding, options, model, stages, texts, ids, codes


def hifigan_dtype(device, dtype):
    """HiFi-GAN's dtype: the model's, but fp32 for bf16 on a CPU without AVX-512 BF16, where bf16 convolutions
    are emulated (60x slower than fp32 on an AVX2 EPYC: bench.py --fast). clvp.py's engine keeps its KV cache
    in fp32 there by the same rule."""
    return clvp.cache_dtype(device, dtype)


def load_stages(args, model, path, device, dtype):
    """(diffusion, vocoder), or (hifigan,): read from path, or random with --random-init."""
    width = model.config.decoder.dim
    if args.decoder == "hifigan":
        dtype = hifigan_dtype(device, dtype)
        if path:
            return (load_hifigan(path, device, width, dtype),)
        torch.manual_seed(0)
        return (HifiGan(width, 32 if args.tiny else HIFI_CHANNELS).to(device, dtype).eval(),)
    if path:
        return load_speak(path, device, width, dtype)
    tiny = DiffusionConfig(dim=64, layers=2, heads=2, latent_dim=width)
    return random_speak(tiny if args.tiny else DiffusionConfig(), device, dtype)


class SpeakProgress(clvp.Progress):
    """clvp.py's progress line, with speak()'s stages; it adds each stage's seconds to times[stage]."""

    def __init__(self, enabled, times, options):
        super().__init__(enabled)
        self.times, self.options, self.current = times, options, None

    def stage(self, name):
        """name starts (None: the last one ends)."""
        now = time.perf_counter()
        if self.current:
            self.times[self.current] = self.times.get(self.current, 0.0) + now - self.began
        self.current, self.began = name, now
        self.show(name or "")

    def diffusion(self, step, steps):
        o = self.options
        self.show(f"diffusion: step {step + 1}/{steps} ({o.sampler}{f', guidance {o.guidance:g}' if o.guidance else ''})")


def spoken(args, device, decoding, options, model, stages, ids, codes, times, quiet):
    """Each part's audio in turn, as float tensors [samples]: one per part, or a stream's chunks."""
    mels = clvp.voice_mels(model, args.audio)
    with torch.inference_mode():
        voice = model.voice_latent(mels)[None]                   # the decoder's voice latent [1, D], once
    if args.decoder == "diffusion":
        diffusion, vocoder = stages
        dtype = diffusion.unconditioned_embedding.dtype
        latent = diffusion.diffusion_latent(diffusion_voice_mels(args.audio, device).to(dtype))   # [1, 2 * dim], once
        finite(latent, "the diffusion's voice latent")
    for text_ids in ids:
        progress = SpeakProgress(not quiet, times, options)
        if args.stream:
            progress.stage("streaming")
            yield from stream(model, stages[0], text_ids, voice, decoding, codes)
            progress.stage(None)
            continue
        progress.stage("decoding")
        gen = model.generate(text_ids, mels, decoding, progress) if codes is None else None
        if args.decoder == "diffusion":
            best = codes if codes is not None else gen.best
            yield speak(model, diffusion, vocoder, text_ids, voice, latent, best.to(device), options, progress)
        else:
            best = codes if codes is not None else spoken_codes(gen, decoding, model.config.decoder.stop_token)
            progress.stage("hifigan")
            yield finite(speak_fast(model, stages[0], text_ids, voice, best.to(device)), "HiFi-GAN's waveform")
        progress.stage(None)


def pcm16(wav):
    """float samples in [-1, 1] -> 16-bit little-endian PCM bytes (x 32767, rounded, as libsndfile writes them)."""
    return (wav.clamp(-1, 1) * 32767).round().to(torch.int16).cpu().numpy().astype("<i2").tobytes()


def run(args):
    device, decoding, options, model, stages, texts, ids, codes = prepare(args)
    quiet = args.quiet or args.json or not sys.stderr.isatty()
    say = (lambda line: print(line, file=sys.stderr)) if args.out == "-" else print    # stdout holds the audio
    if args.random_init and not args.json:
        say("NOTE: --random-init: the weights are random, so the audio is noise; this run only shows every "
            f"stage working (on {args.max_new_tokens} speech tokens per candidate).")
    times, samples, first = {}, 0, None
    t0 = time.perf_counter()
    parts = spoken(args, device, decoding, options, model, stages, ids, codes, times, quiet)
    if args.out == "-":
        samples, first, closed = write_pcm(parts, t0)
        if closed:                            # the reader went away: write_pcm said so, in one line
            return 0
    else:
        tokens = decoding.max_new_tokens if codes is None else codes.shape[-1]
        container = wav_container(len(ids), tokens, args.pcm16)

        def write(f):        # each part (or chunk) written as soon as it is made, so memory holds one part's
            nonlocal samples, first       # audio, never the whole text's
            with soundfile.SoundFile(f, "w", SAMPLE_RATE, 1, "PCM_16" if args.pcm16 else "FLOAT", format=container) as wav:
                for part in parts:
                    first = first or time.perf_counter() - t0
                    wav.write(part.cpu().numpy())
                    samples += len(part)
        try:
            clvp.write_atomically(args.out, write)
        except OSError as e:
            raise clvp.UsageError(f"{args.out}: cannot write it ({e.strerror or clvp.first_line(e)})") from None
    seconds, wall = samples / SAMPLE_RATE, time.perf_counter() - t0
    report = dict(out=args.out, sample_rate=SAMPLE_RATE, seconds=round(seconds, 4), parts=len(texts),
                  decoder=args.decoder, stream=args.stream, random_init=args.random_init,
                  first_audio_seconds=round(first or 0.0, 3), real_time_factor=round(wall / max(seconds, 1e-9), 3),
                  stages={k: round(v, 3) for k, v in times.items()})
    if args.json:
        print(json.dumps(report))
    else:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        say(f"{seconds:.2f} s of audio at {SAMPLE_RATE} Hz written to {'standard output' if args.out == '-' else args.out} "
            f"({stages}; first audio after {first or 0.0:.1f} s, {report['real_time_factor']:g} s per second of audio)")
    return 0


def write_pcm(parts, t0):
    """--out -: each part or chunk to standard output as 16-bit PCM as soon as it is made -> (samples, seconds to
    the first, whether the reader went away). A reader that goes away (the player quit: EPIPE) ends the run
    with one line and exit code 0."""
    out, samples, first = sys.stdout.buffer, 0, None
    try:
        for part in parts:
            out.write(pcm16(part))
            out.flush()
            first, samples = first or time.perf_counter() - t0, samples + len(part)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's own last flush must not fail
        print(f"speak.py: standard output was closed (the player quit?) after {samples / SAMPLE_RATE:.2f} s of "
              "audio; stopped", file=sys.stderr)
        return samples, first, True
    except OSError as e:                                                 # a full disk behind a redirection
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise clvp.UsageError(f"--out -: cannot write to standard output ({e.strerror or clvp.first_line(e)}) "
                              f"after {samples / SAMPLE_RATE:.2f} s of audio") from None
    return samples, first, False


def main(argv=None):
    return clvp.run_command("speak.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
