"""clvp.py: CLVP, the text/voice ranker inside Tortoise TTS, in one file.

Tortoise turns text into speech in three stages. A GPT-2 style decoder, prompted with a voice and a
sentence, samples many candidate sequences of discrete "speech tokens". CLVP (Contrastive
Language-Voice Pretraining, CLIP for text and speech tokens) scores every candidate against the
sentence and keeps the best. A diffusion model and a vocoder then turn the winners into audio; those
last stages are in speak.py.

    text --clean_text--> --Tokenizer--> ids ---------------------------.
    voice.wav --load_audio--> --log_mel_spectrogram--> mel             |
        mel --ConditioningEncoder--> voice latent                      v
        [voice latent, text embeddings, start] --Decoder (sample N)--> candidates [N, T]
        ids --Encoder(text)--> text features     candidates --Encoder(speech)--> speech features
        cosine similarity * exp(logit_scale) --> scores --> best candidates

The file has four parts. Part I, the lesson, is that pipeline in its plainest correct form, in that
order, ending in speech_tokens(), which puts it together. Part II, the engine, is the same generation,
fast; it gives the lesson's numbers (test_clvp.py), and the command line runs it unless told
--engine lesson. Part III, the boundaries, checks what a user hands in and writes files whole; a
lesson function calls it in at most one line, so a piece of Part I copies out by deleting that line.
Part IV is the command line. Shapes are noted as [batch, ..., dim]. Numbers match the Hugging Face port
(test_clvp.py) and the original Tortoise code (test_tortoise.py); where those differ, comments say which
this file follows. convert_weights.py (checkpoints, downloads) and bench.py import this file, never back.
"""
import argparse
import concurrent.futures
import contextlib
import errno
import functools
import json
import math
import os
import re
import resource
import signal
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import scipy.signal
import soundfile
import torch
import torch.nn as nn
import torch.nn.functional as F


# ===================================================================================================
# Part I: the lesson. What Tortoise computes, from text and a voice clip to ranked speech tokens.
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# Configuration
#
# The official Tortoise sizes are the defaults. The token ids that the original hard-codes (text start
# 255, text stop 0, speech start 8192, speech stop 8193) live here too, and the code below reads them
# from the config rather than repeating the numbers.
# ---------------------------------------------------------------------------------------------------

@dataclass
class EncoderConfig:
    """One CLVP encoder (text or speech): a rotary, RMSNorm, GLU transformer with mean pooling."""
    vocab_size: int = 256
    dim: int = 768
    layers: int = 20
    heads: int = 12
    ff_dim: int = 1536        # GLU width: the in-projection is 2 * ff_dim wide, half of it is the gate
    rotary_dim: int = 32      # rotary covers the first 32 of each head's 64 dims
    projection_dim: int = 768


@dataclass
class DecoderConfig:
    """The autoregressive speech-token decoder (GPT-2 blocks) and its conditioning encoder."""
    dim: int = 1024
    layers: int = 30
    heads: int = 16
    speech_vocab_size: int = 8194        # 8192 speech codes + start + stop
    speech_positions: int = 608
    start_token: int = 8192
    stop_token: int = 8193
    text_vocab_size: int = 256
    text_positions: int = 404
    text_start_token: int = 255
    text_stop_token: int = 0
    mel_channels: int = 80
    conditioning_blocks: int = 6


@dataclass
class Config:
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: EncoderConfig = field(default_factory=EncoderConfig)
    speech: EncoderConfig = field(default_factory=lambda: EncoderConfig(vocab_size=8192))

    @classmethod
    def from_dict(cls, d):
        """A checkpoint's config (what asdict writes) -> Config: {"decoder": {...}, "text": ..., "speech": ...}."""
        check_config_dict(d)
        return cls(*(kind(**d[part]) for part, kind in CONFIG_PARTS.items()))


CONFIG_PARTS = {"decoder": DecoderConfig, "text": EncoderConfig, "speech": EncoderConfig}


def tiny_config():
    """A small model with the official structure, for tests and for watching the pipeline run."""
    small = dict(dim=64, layers=2, heads=2, ff_dim=128, rotary_dim=32, projection_dim=64)
    return Config(DecoderConfig(dim=64, layers=2, heads=4, conditioning_blocks=2),
                  EncoderConfig(**small), EncoderConfig(vocab_size=8192, **small))


# ---------------------------------------------------------------------------------------------------
# Text: English cleaners and the BPE tokenizer
#
# Tortoise turns text into ids in two steps, reproduced here without their dependencies:
#   clean_text: Tortoise's english_cleaners. Transliterate to ASCII (unidecode there), lowercase,
#     spell out numbers (inflect there), expand a few abbreviations, collapse whitespace, drop '"'.
#     The transliteration table and the number speller are not CLVP; they sit in the appendix at the
#     end of the file, and clean_text calls them in one line.
#   Tokenizer: the 255-token BPE of Tortoise's tokenizer.json. Spaces become the token [SPACE]; anything
#     outside the vocabulary (digits, '"', '&', ...) becomes [UNK], one per character.
# transformers' ClvpTokenizer has its own number normalizer and a byte-level pre-tokenizer, which differ
# from Tortoise ('1999' -> 'one thousand, nine hundred ...', '21st' -> 'twenty-onest', 'café' -> 'caf');
# the model was trained on Tortoise's text, so this follows Tortoise.
# ---------------------------------------------------------------------------------------------------

# Applied one after another, as in Tortoise: 'mrs' before 'mr', and 'mr.st.' -> 'misterst.' (the
# '\b' before 'st' is gone once 'mr.' is replaced). Numbers come first, so '1st.' stays 'first.'.
_ABBREVIATIONS = [(re.compile(rf'\b{short}\.'), long) for short, long in [
    ('mrs', 'misess'), ('mr', 'mister'), ('dr', 'doctor'), ('st', 'saint'), ('co', 'company'),
    ('jr', 'junior'), ('maj', 'major'), ('gen', 'general'), ('drs', 'doctors'), ('rev', 'reverend'),
    ('lt', 'lieutenant'), ('hon', 'honorable'), ('sgt', 'sergeant'), ('capt', 'captain'),
    ('esq', 'esquire'), ('ltd', 'limited'), ('col', 'colonel'), ('ft', 'fort')]]


def clean_text(text):
    """Tortoise's english_cleaners: 'Dr. Smith paid $5 in 1999.' ->
    'doctor smith paid five dollars in nineteen ninety-nine.'"""
    text = spell_numbers(to_ascii(text).lower())             # the appendix: unidecode's and inflect's work
    for pattern, replacement in _ABBREVIATIONS:
        text = pattern.sub(replacement, text)
    # The quote is removed after whitespace is collapsed: 'a " b' -> 'a  b' (two spaces).
    return re.sub(r'\s+', ' ', text).replace('"', '')


# BPE in the style of minbpe: a word is a list of ids; repeatedly merge the adjacent pair with the
# lowest rank (earliest in the merges list), all its occurrences left to right, until none can merge.
# tokenizers gets the same result from its priority queue of (rank, position).
def merge(ids, pair, new_id):
    """Replace every occurrence of pair in ids, left to right: merge([1, 1, 1], (1, 1), 9) -> [9, 1]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bpe(ids, ranks):
    """ranks: {(id, id): (rank, merged id)}."""
    while len(ids) > 1:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, (float('inf'),)))
        if pair not in ranks:
            break
        ids = merge(ids, pair, ranks[pair][1])
    return ids


# tokenizers' 'Whitespace' pre-tokenizer: a word is a run of letters (digits, '_') or a run of other
# non-space characters; merges stay inside a word.
_WORD_RE = re.compile(r'\w+|[^\w\s]+')


class Tokenizer:
    """Tortoise's VoiceBpeTokenizer. vocab: {token: id}; merges: [(a, b), ...], lowest rank first."""

    def __init__(self, vocab, merges):
        check_tokenizer(vocab, merges)
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.tokens = {i: t for t, i in self.vocab.items()}
        self.ranks = {(self.vocab[a], self.vocab[b]): (rank, self.vocab[a + b])
                      for rank, (a, b) in enumerate(self.merges)}
        self.unk, self.space = self.vocab['[UNK]'], self.vocab['[SPACE]']
        self.cache = {}                           # word -> ids: a text repeats its words

    @classmethod
    def from_file(cls, path):
        """Tortoise's tokenizer.json (convert_weights.py also reads transformers' vocab.json + merges.txt)."""
        return cls(*read_tokenizer_json(path))

    def encode(self, text):
        """'Hello world' -> [62, 84, 28, 2, 179, 79]: 'he' 'll' 'o' [SPACE] 'wor' 'ld'."""
        # Tortoise writes each space as '[SPACE]', which tokenizers splits off as a special token.
        ids = []
        for i, chunk in enumerate(clean_text(text).split(' ')):
            if i:
                ids.append(self.space)
            for word in _WORD_RE.findall(chunk):
                if word not in self.cache:
                    self.cache[word] = bpe([self.vocab.get(ch, self.unk) for ch in word], self.ranks)
                ids += self.cache[word]
        return ids

    def decode(self, ids):
        """As Tortoise: [SPACE] is a space, [STOP] and [UNK] vanish, unknown ids are skipped."""
        text = ''.join(self.tokens.get(int(i), '') for i in ids)
        return text.replace('[SPACE]', ' ').replace('[STOP]', '').replace('[UNK]', '')


# ---------------------------------------------------------------------------------------------------
# Audio: a voice clip on disk -> an 80-band log-mel spectrogram
#
# The conditioning encoder reads the reference voice as Tortoise's TorchMelSpectrogram made it: 22.05 kHz,
# STFT (n_fft 1024, hop 256, Hann), power, an 80-band mel filterbank (HTK mel scale, Slaney area
# normalization, 0-8000 Hz), natural log, and a per-band division by Tortoise's mel_norms.pth (shipped
# as data/mel_norms.safetensors). It is written here with torch.stft and a filterbank built by hand; the
# numbers match transformers' ClvpFeatureExtractor.
# Where this differs from Tortoise on purpose: load_audio averages all channels (Tortoise keeps the
# first) and resamples with scipy's polyphase filter (Tortoise: torchaudio's sinc); format_conditioning
# keeps the first 6 s where Tortoise cuts a random 6 s window, so the same clip always scores the same.
# ---------------------------------------------------------------------------------------------------

SAMPLE_RATE = 22050             # Hz; everything in CLVP/Tortoise runs at this rate
N_FFT = 1024                    # FFT size -> N_FFT // 2 + 1 = 513 frequency bins
HOP = 256                       # samples between frames (~11.6 ms)
WIN = N_FFT                     # Hann window length
N_MELS = 80
F_MIN, F_MAX = 0.0, 8000.0      # Hz covered by the mel bands
CONDITIONING_SAMPLES = 6 * SAMPLE_RATE   # 6 s, 132300 samples -> 517 mel frames
MIN_SAMPLES = N_FFT // 2 + 1    # centred STFT reflect-pads N_FFT // 2 samples; needs more than that
MARGIN = 0.1                    # s read past `seconds`: many times the resampler's reach


def load_audio(path, sampling_rate=SAMPLE_RATE, seconds=None) -> torch.Tensor:
    """Read WAV/FLAC/OGG (MP3 if libsndfile has it) -> mono float32 [samples] in [-1, 1] at sampling_rate:
    all of it, or only the first `seconds`. open_audio is soundfile.SoundFile(path), with the file and its
    header checked first (Part III)."""
    with open_audio(path, sampling_rate, seconds) as f:
        frames = -1 if seconds is None else math.ceil((seconds + MARGIN) * f.samplerate)   # -1: all of it
        wav, sr = f.read(frames, dtype="float32", always_2d=True).mean(axis=1), f.samplerate  # channels -> mono
    if sr != sampling_rate:  # polyphase resampling by the reduced ratio, e.g. 48000 -> 22050 is *147/320
        g = math.gcd(sr, sampling_rate)
        wav = scipy.signal.resample_poly(wav, sampling_rate // g, sr // g).astype(np.float32)
    if seconds is not None:
        wav = wav[:math.ceil(seconds * sampling_rate)]
    check_clip(path, wav, sampling_rate)              # not empty, finite, long enough for the STFT (Part III)
    return torch.from_numpy(np.clip(wav, -1.0, 1.0))  # float files and resampling ringing can overshoot full scale


def format_conditioning(wav: torch.Tensor) -> torch.Tensor:
    """[..., samples] -> [..., CONDITIONING_SAMPLES]: zero-pad at the end, or keep the first 6 s.
    Tortoise pads the same way (F.pad at the end) but cuts at a random offset; we cut from
    the start so the same clip always gives the same score (== ClvpFeatureExtractor)."""
    gap = CONDITIONING_SAMPLES - wav.shape[-1]
    return F.pad(wav, (0, gap)) if gap > 0 else wav[..., :CONDITIONING_SAMPLES]


@functools.lru_cache(maxsize=None)  # built once per (device, dtype)
def mel_filterbank(device=torch.device("cpu"), dtype=torch.float32) -> torch.Tensor:
    """[N_MELS, N_FFT // 2 + 1] = [80, 513] triangles, HTK mel spacing, Slaney area norm.
    Same formula as torchaudio.functional.melscale_fbanks(norm='slaney', mel_scale='htk')
    (Tortoise) and transformers' mel_filter_bank (identical in float64, which we build in)."""
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # HTK formula
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)  # [513] centre of each FFT bin
    # N_MELS + 2 edges equally spaced in mel; band i rises on edge i..i+1, falls on i+1..i+2.
    edges = mel_to_hz(np.linspace(hz_to_mel(F_MIN), hz_to_mel(F_MAX), N_MELS + 2))  # [82]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]            # [80, 1] each
    rise, fall = (fft_hz - lo) / (mid - lo), (hi - fft_hz) / (hi - mid)          # [80, 513]
    fb = np.maximum(0.0, np.minimum(rise, fall))
    fb *= 2.0 / (hi - lo)  # Slaney: each triangle has unit area, so wide bands don't get louder
    return torch.from_numpy(fb).to(device=device, dtype=dtype)


def log_mel_spectrogram(wav: torch.Tensor, mel_norms: torch.Tensor | None = None) -> torch.Tensor:
    """[samples] -> [80, frames] or [B, samples] -> [B, 80, frames]; frames = 1 + samples // HOP.
    Runs on wav's device/dtype. mel_norms: [80] per-band divisors (tortoise/data/mel_norms.pth)."""
    check_wav(wav, mel_norms)
    window = torch.hann_window(WIN, periodic=True, device=wav.device, dtype=wav.dtype)  # torchaudio's default
    spec = torch.stft(wav, N_FFT, HOP, WIN, window, center=True, pad_mode="reflect",
                      return_complex=True)                          # [(B,) 513, frames] complex
    power = spec.abs() ** 2                                         # power spectrum (torchaudio power=2)
    mel = mel_filterbank(wav.device, wav.dtype) @ power              # [(B,) 80, frames]
    log_mel = torch.log(torch.clamp(mel, min=1e-5))                 # Tortoise's "dynamic range compression"
    if mel_norms is not None:                                       # per-band scale the models were trained on
        log_mel = log_mel / mel_norms.to(log_mel)[:, None]          # [80, 1] broadcasts over frames
    return log_mel


# ---------------------------------------------------------------------------------------------------
# Networks (1/4): attention, shared by every block below
#
# The three kinds of network (conditioning encoder, decoder, CLVP encoder) all use plain multi-head
# attention; they differ only in what goes around it (GroupNorm, rotary, a causal mask, a KV cache). One
# Linear makes q, k and v together; these helpers split and merge heads, and torch's
# scaled_dot_product_attention does the rest.
# ---------------------------------------------------------------------------------------------------

def split_heads(qkv, heads):
    """[B, T, 3 * D] -> three tensors of [B, heads, T, D / heads]."""
    B, T, _ = qkv.shape
    return qkv.view(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x):
    """[B, heads, T, head_dim] -> [B, T, heads * head_dim]."""
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)


def attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(head_dim)) v: [B, heads, T, hd] -> [B, heads, T, hd]. causal: query i sees keys
    0..i only (q and k the same length)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# ---------------------------------------------------------------------------------------------------
# Networks (2/4): conditioning encoder, a reference clip's mel spectrogram -> one voice latent
#
# A 1x1 convolution lifts the 80 mel bands to the decoder width, then a few GroupNorm + self-attention
# blocks (from the guided-diffusion UNet) let every frame see the whole clip. The latent is simply the
# first frame's output. The original fuses q, k, v in one 1x1 conv with the heads interleaved
# ([heads, 3 * head_dim]); convert_weights.py reorders that into the [q; k; v] layout used here.
# ---------------------------------------------------------------------------------------------------

def groupnorm_groups(channels):
    """The original's rule for GroupNorm groups: 32, fewer for narrow layers, always dividing channels."""
    groups = 8 if channels <= 16 else 16 if channels <= 64 else 32
    while channels % groups:
        groups //= 2
    return groups


class ConditioningBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groupnorm_groups(dim), dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):                                    # x: [C, frames, D]
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)     # GroupNorm wants channels first
        q, k, v = split_heads(self.qkv(h), self.heads)
        return x + self.out(merge_heads(attention(q, k, v)))


class ConditioningEncoder(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.conv = nn.Conv1d(c.mel_channels, c.dim, kernel_size=1)
        self.blocks = nn.ModuleList(ConditioningBlock(c.dim, c.heads) for _ in range(c.conditioning_blocks))

    def forward(self, mels):                                 # mels: [C, 80, frames]
        x = self.conv(mels).transpose(1, 2)                  # [C, frames, D]
        for block in self.blocks:
            x = block(x)
        return x[:, 0]                                       # [C, D]: the first frame is the latent


# ---------------------------------------------------------------------------------------------------
# Networks (3/4): decoder, GPT-2 over [voice latent, text, speech tokens]
#
# Tortoise's "UnifiedVoice" is a stock GPT-2 whose own token and position tables are unused. Instead it
# has two pairs of tables: text tokens + text positions, and speech tokens + speech positions. The
# prompt for generation is
#     [voice latent] + text_emb([255] + ids + [0, 0]) + text_pos(0, 1, ...) + [speech_emb(8192) + speech_pos(0)]
# (two stop tokens: one padded by api.py, one by inference_speech). After the blocks come two LayerNorms
# in a row (GPT-2's ln_f, then UnifiedVoice's final_norm) and the head over the 8194 speech tokens.
#
# The position quirk: at inference the original gives the k-th generated token speech position k + 1,
# so position 1 is never used (training used 0, 1, 2, ...). It comes from the cached path. There,
# inference_speech stores the mel_len = 1 + text embeddings and builds a fake prompt of
# conds.shape[1] + emb.shape[1] ids; emb already begins with the conditioning latent, so the fake prompt
# is mel_len + 1 ids long, the start token last. GPT2InferenceModel embeds the start token at position 0,
# and every later token at attention_mask.shape[1] - mel_len: when the k-th generated token goes in, the
# mask covers the mel_len + 1 fake ids and the k generated ones, so its position is k + 1. Every published
# Tortoise sample was made that way, and the weights expect it, so generation here does the same.
# ---------------------------------------------------------------------------------------------------

def speech_position(k):
    """Speech position of the k-th generated token (k = 1, 2, ...); the start token sits at 0."""
    return k + 1


class DecoderBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x, layer=0, cache=None, start=0):          # x: [B, T, D] at positions start..
        q, k, v = split_heads(self.qkv(self.norm1(x)), self.heads)
        # No cache: every position at once, causal (teacher forcing). A cache (the next section) stores
        # this layer's k and v at positions start.. and attends over everything it holds.
        a = attention(q, k, v, causal=True) if cache is None else cache.attend(layer, q, k, v, start)
        x = x + self.out(merge_heads(a))
        return x + self.proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))   # GPT-2's gelu_new


class Decoder(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.config = c
        self.text_embedding = nn.Embedding(c.text_vocab_size, c.dim)
        self.text_positions = nn.Embedding(c.text_positions, c.dim)
        self.speech_embedding = nn.Embedding(c.speech_vocab_size, c.dim)
        self.speech_positions = nn.Embedding(c.speech_positions, c.dim)
        self.blocks = nn.ModuleList(DecoderBlock(c.dim, c.heads) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.final_norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.speech_vocab_size)

    def prompt_length(self, text_len):
        return 1 + (text_len + 3) + 1                         # latent, [start] + ids + [stop, stop], start

    def prompt(self, latent, text_ids):
        """latent [B, D], raw text ids [B, T] -> the prompt embeddings [B, prompt_length(T), D]."""
        c = self.config
        text = F.pad(F.pad(text_ids, (1, 0), value=c.text_start_token), (0, 2), value=c.text_stop_token)
        text = self.text_embedding(text) + self.text_positions.weight[:text.shape[1]]
        start = self.embed_speech(torch.tensor([c.start_token], device=text.device), 0)
        B = text.shape[0]
        return torch.cat([latent[:, None], text, start.expand(B, 1, -1)], dim=1)

    def embed_speech(self, tokens, position):
        """Speech tokens [...] at one speech position -> [..., D]."""
        return self.speech_embedding(tokens) + self.speech_positions.weight[position]

    def forward(self, x, cache=None, start=0):              # x: [B, T, D] embeddings -> hidden [B, T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, i, cache, start)
        return x

    def latent(self, h):               # [B, T, D] -> [B, T, D]: GPT-2's ln_f, then UnifiedVoice's final_norm
        return self.final_norm(self.norm(h))

    def logits(self, h):                                     # [B, T, D] -> [B, T, 8194]
        return self.head(self.latent(h))


# ---------------------------------------------------------------------------------------------------
# Networks (3/4, continued): the KV cache, the prefill and one decode step
#
# A decoder makes one token at a time, and each new token attends to every position before it. Rather
# than run the earlier positions again at every step, each layer keeps the keys and values it has
# computed: gpt-fast's KV cache, one buffer per layer, [rows, heads, positions, head_dim], allocated once
# for the longest sequence and written in place. The prefill runs the prompt (P positions) through the
# blocks once and fills positions 0..P-1; each decode step runs one new token per row, stores its keys
# and values at the next position and attends over the filled part. The prompt is the same for every
# candidate of a text, so it is prefilled once, in one row, and each batch of candidates starts from
# copies of that row (KVCache.repeat).
# ---------------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer, k and v: [layers, rows, heads, positions, head_dim]."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    @classmethod
    def empty(cls, c: DecoderConfig, rows, positions, device, dtype):
        shape = (c.layers, rows, c.heads, positions, c.dim // c.heads)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def repeat(self, rows):
        """A one-row cache -> a cache of `rows` copies of it, each to be continued on its own."""
        return KVCache(self.k.repeat(1, rows, 1, 1, 1), self.v.repeat(1, rows, 1, 1, 1))

    def attend(self, layer, q, k, v, start):
        """q, k, v [rows, heads, T, head_dim] at positions start..start+T-1: store k and v, then attend over
        positions 0..start+T-1 -> [rows, heads, T, head_dim]. The prefill (start 0) is causal; a decode
        step's one query sees every position so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end], self.v[layer, :, :, start:end] = k, v
        return attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end], causal=start == 0)


def prefill(decoder, prompts, cache):
    """Prompts [rows, P, D] through every block once, their keys and values into the cache -> logits
    [rows, vocab] for the first generated token."""
    return decoder.logits(decoder(prompts, cache)[:, -1])


def decode_step(decoder, tokens, k, cache, prompt_length):
    """The k-th generated tokens [B] (k = 1, 2, ...) -> logits [B, vocab] for the next ones. The cache holds
    the prompt at positions 0..P-1 and the earlier tokens after it; these go in at P + k - 1."""
    x = decoder.embed_speech(tokens[:, None], speech_position(k))           # [B, 1, D]
    return decoder.logits(decoder(x, cache, prompt_length + k - 1)[:, -1])   # [B, vocab]


# ---------------------------------------------------------------------------------------------------
# Networks (4/4): CLVP encoders, token ids -> one feature vector
#
# The text and the speech encoder are the same network with different vocabularies: an x-transformers
# Encoder with pre-RMSNorm, rotary position embeddings and a GLU feed-forward, then a LayerNorm, the mean
# over all positions (no padding mask: padding changes the score, which is why generation pads the way
# Tortoise did) and a projection into the shared 768-wide space.
#
# Quirk: the x-transformers version Tortoise used rotates v as well as q and k, over the first 32 dims
# of each head only. RMSNorm follows the Hugging Face port (x * rsqrt(mean(x^2) + 1e-5)); x-transformers
# divides by max(rms, 1e-8) instead, which the parity tests against the original do not see (< 1e-5).
# ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_tables(length, rotary_dim, device):
    """cos and sin tables [length, rotary_dim] for positions 0..length-1 (RoFormer, base 10000)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate the first rotary_dim dims of x [B, heads, T, hd] by position; the rest pass through."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half1, half2 = rot.chunk(2, dim=-1)
    rot = rot * cos + torch.cat([-half2, half1], dim=-1) * sin
    return torch.cat([rot, rest], dim=-1)


class EncoderBlock(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.heads = c.heads
        self.norm1 = RMSNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=False)
        self.out = nn.Linear(c.dim, c.dim)
        self.norm2 = RMSNorm(c.dim)
        self.ff_in = nn.Linear(c.dim, 2 * c.ff_dim)
        self.ff_out = nn.Linear(c.ff_dim, c.dim)

    def forward(self, x, cos, sin):                          # x: [B, T, D]
        q, k, v = (apply_rotary(t, cos, sin) for t in split_heads(self.qkv(self.norm1(x)), self.heads))
        x = x + self.out(merge_heads(attention(q, k, v)))
        h, gate = self.ff_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.ff_out(h * F.gelu(gate))


class Encoder(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.config = c
        self.embedding = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.projection = nn.Linear(c.dim, c.projection_dim, bias=False)

    def forward(self, ids):                                  # ids: [B, T] -> features [B, projection_dim]
        x = self.embedding(ids)
        cos, sin = rotary_tables(ids.shape[1], self.config.rotary_dim, ids.device)
        for block in self.blocks:
            x = block(x, cos.to(x.dtype), sin.to(x.dtype))
        return self.projection(self.norm(x).mean(dim=1))


# ---------------------------------------------------------------------------------------------------
# The model: Tortoise's autoregressive half and CLVP, the four networks, and what a user asks of them
#
# CLVP scores the way CLIP does. Both of its encoders map into one 768-wide space, trained so that a
# text and the speech that says it point the same way, away from the other texts and speeches of the
# batch: contrastive_loss is the cross-entropy of picking each row's true partner among all of them, both
# ways. So the cosine between a text's features and a candidate's says how well the candidate says that
# text, and exp(logit_scale), learned in training, stretches it into a score.
#
# Why sample many candidates and rerank them: the decoder chooses each token from what came before, one
# step at a time, so a sample can go wrong in ways it never sees whole (a word dropped or said twice, a
# run past the end of the text); CLVP compares the whole candidate with the whole text at once. Tortoise
# takes this from DALL-E, which reranks its image samples with CLIP: sample N (16 to 512 in Tortoise),
# keep the best by CLVP.
#
# Each public method checks its arguments in its first line (Part III): bad ids or mels are a ValueError
# naming the argument, not an IndexError from deep inside torch.
# ---------------------------------------------------------------------------------------------------

class DecoderAndCLVP(nn.Module):
    """Tortoise's autoregressive model (the conditioning encoder and the decoder: UnifiedVoice in the
    original) and CLVP (the text and the speech encoder, and the logit scale)."""

    def __init__(self, config: Config = None):
        super().__init__()
        self.config = config = config or Config()
        self.conditioning = ConditioningEncoder(config.decoder)
        self.decoder = Decoder(config.decoder)
        self.text_encoder = Encoder(config.text)
        self.speech_encoder = Encoder(config.speech)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # learned, used as exp()
        self.tokenizer = None
        # [80] per-band divisors of the log-mel; a buffer, so .to() moves it, but not a weight to save.
        self.register_buffer("mel_norms", None, persistent=False)

    def conditioning_latent(self, mels):
        """mels [C, 80, frames], one reference clip per row -> latents [C, D]."""
        return self.conditioning(checked_mels(mels, self))

    def voice_latent(self, mels):
        """Several clips of one voice, mels [C, 80, frames] -> one latent [D]: Tortoise averages them."""
        return self.conditioning_latent(mels).mean(dim=0)

    def speech_logits(self, mels, text_ids, speech_ids):
        """Teacher-forced next-token logits, using the inference positions.

        mels: one voice, [C, 80, frames]; text_ids: raw tokenizer ids [B, T] or [1, T]; speech_ids: [B, S]
        tokens after the start token. Returns [B, S + 1, 8194]: row s predicts token s + 1 (row 0 is what
        the prompt predicts).
        """
        text_ids, speech_ids = checked_teacher_forcing(self, text_ids, speech_ids)
        B, S = speech_ids.shape
        prompt = self.decoder.prompt(self.voice_latent(mels).expand(B, -1), text_ids.expand(B, -1))
        positions = speech_position(torch.arange(1, S + 1, device=speech_ids.device))
        speech = self.decoder.speech_embedding(speech_ids) + self.decoder.speech_positions(positions)
        h = self.decoder(torch.cat([prompt, speech], dim=1))
        return self.decoder.logits(h[:, prompt.shape[1] - 1:])

    def text_features(self, text_ids):
        """Raw text ids [B, T] -> [B, 768], projected, not normalized. Like Tortoise's reranking, the
        encoder sees the ids followed by one stop token. T is at most what the decoder reads (404)."""
        text_ids = checked_ids(text_ids, "text_ids", self.config.text.vocab_size, self.logit_scale.device,
                               self.config.decoder.text_positions)
        return self.text_encoder(F.pad(text_ids, (0, 1), value=self.config.decoder.text_stop_token))

    def speech_features(self, speech_ids):
        """Speech tokens [B, S] (already fixed, see fix_candidates) -> [B, 768], not normalized. S is at most
        what the decoder makes (608)."""
        return self.speech_encoder(checked_ids(speech_ids, "speech_ids", self.config.speech.vocab_size,
                                               self.logit_scale.device, self.config.decoder.speech_positions))

    def similarity(self, text_ids, speech_ids):
        """Scaled cosine similarity [B_text, B_speech]: the CLVP score."""
        return self.score(self.text_features(text_ids), self.speech_features(speech_ids))

    def score(self, text_features, speech_features):
        """Features [B_text, 768] and [B_speech, 768] -> exp(logit_scale) * cosine, [B_text, B_speech]."""
        t, s = F.normalize(text_features, dim=-1), F.normalize(speech_features, dim=-1)
        return self.logit_scale.exp() * t @ s.T

    def contrastive_loss(self, text_ids, speech_ids):
        """CLIP's symmetric cross-entropy over a batch of matching (text, speech) rows."""
        sim = self.similarity(text_ids, speech_ids)
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2

    def generate(self, text_ids, mels, options=None, progress=None, **overrides):
        """Sample candidates and rank them (the next section). text_ids: raw ids [T] or [1, T] of one text
        -> a Generation; or a list of them -> a list of Generations, one per text. options: a DecodingOptions,
        whose fields keywords override: generate(ids, mels, num_candidates=4, seed=0). options.engine picks
        the engine (Part II, which decodes a list's texts together) or this lesson's generate_and_rank."""
        ids, mels, options = checked_generate_args(self, text_ids, mels, options, overrides)   # ids: a list
        if options.engine == "lesson":
            generations = [generate_and_rank(self, t, mels, options, progress) for t in ids]
        else:
            generations = generate_together(self, ids, mels, options, progress)
        # Tensors made in inference mode cannot enter autograd later; hand back ordinary copies.
        generations = [Generation(**{name: t.clone() for name, t in vars(g).items()}) for g in generations]
        return generations if isinstance(text_ids, (list, tuple)) else generations[0]


# ---------------------------------------------------------------------------------------------------
# Generation and reranking: sample N candidates for one text, score them with CLVP, keep the best
#
# 1. prefill the prompt once (voice latent, text, start token) into a one-row KV cache; then each batch
#    of candidates decodes from copies of it: next_tokens turns a step's logits into tokens, decode_step
#    feeds them back. A candidate that emits the stop token keeps emitting it; a batch ends early when
#    all its candidates have stopped.
# 2. fix_candidates cleans each candidate up as Tortoise's fix_autoregressive_output does.
# 3. rank: CLVP scores every candidate against the text, best first.
#
# next_tokens applies transformers' processors in its order: repetition penalty, temperature, top-k where
# asked (api_fast.py: 50), top-p, typical sampling where asked. The original's typical_sampling=True passes
# TypicalLogitsWarper as a logits processor, which under its transformers 4.31 runs before temperature.
# The repetition penalty covers the start token and the tokens generated so far, as in the Hugging
# Face port. The original Tortoise prompt also held a run of fake token-1 entries, so it penalized
# speech token 1 as well; see the README.
# ---------------------------------------------------------------------------------------------------

FIX_STOP_CODE, FIX_TAIL = 83, (45, 45, 248)    # Tortoise's codes for "silence" and a clean ending


@dataclass
class DecodingOptions:
    """How to sample and rank; temperature 0 is greedy. The sampling values are Tortoise's (api.py's tts():
    temperature 0.8, top_p 0.8, repetition penalty 2.0, 500 tokens); 16 candidates is its ultra_fast preset
    (tts() itself samples 512, do_tts.py's default preset, fast, 96)."""
    num_candidates: int = 16
    batch_size: int = 16               # candidates decoded together (one KV cache row each)
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_p: float = 0.8
    repetition_penalty: float = 2.0
    typical_mass: float | None = None  # typical sampling, off unless set
    sample_top_k: int | None = None    # sample among the k most likely tokens only (api_fast.py: 50); off unless set
    keep: int = 1                      # how many of the ranked candidates Generation.best keeps
    seed: int | None = None
    pad_to_max: bool = True            # stop-pad candidates to max_new_tokens before scoring (Tortoise)
    engine: str = "fast"               # "fast" (Part II) or "lesson" (this part's generate_and_rank)
    cache_dtype: str | None = None     # the engine's KV cache: "float32", "bfloat16", "float16"; None: its rule

    def rows(self, texts=1):
        """How many rows decode together for `texts` texts: one batch, or all their candidates if fewer."""
        return min(self.batch_size, self.num_candidates * texts)


@dataclass
class Generation:
    candidates: torch.Tensor   # [N, T] fixed speech tokens, exactly as CLVP scored them
    lengths: torch.Tensor      # [N] tokens before each candidate's stop token
    scores: torch.Tensor       # [N] CLVP score of each candidate against the text
    order: torch.Tensor        # [N] candidate indices, best first
    best: torch.Tensor         # [keep, T] the best candidates, best first


def repetition_penalty(logits, seen, penalty):
    """Make every token already seen less likely: positive logits / penalty, negative * penalty."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def top_k_filter(logits, k):
    """Keep the k most likely tokens (and any tied with the k-th), as transformers' top_k does."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits, top_p):
    """Nucleus: keep the most likely tokens whose probabilities add up to top_p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1)                            # ascending
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), -math.inf)


def typical_filter(logits, mass):
    """Typical sampling: keep the tokens whose surprise is closest to the entropy, up to `mass`."""
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
    distance, order = (-logp - entropy).abs().sort(dim=-1)
    cumulative = logits.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=logits.shape[-1] - 1)
    remove = distance > distance.gather(1, last[:, None])
    remove[:, 0] = False
    return logits.masked_fill(remove.scatter(1, order, remove), -math.inf)


def next_tokens(logits, seen, options, generator):
    """[B, vocab] logits -> [B] tokens, in fp32 whatever the model's dtype (the penalty applies even when greedy)."""
    logits = repetition_penalty(logits.float(), seen, options.repetition_penalty)
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    # Moving the best logit to 0 changes no probability, but keeps any finite penalty and temperature finite.
    logits.clamp_(max=torch.finfo(logits.dtype).max)          # in place: logits is the penalty's own copy
    logits.sub_(logits.max(dim=-1, keepdim=True).values).div_(options.temperature)
    if options.sample_top_k is not None:
        logits = top_k_filter(logits, options.sample_top_k)
    if options.top_p < 1:
        logits = top_p_filter(logits, options.top_p)
    if options.typical_mass is not None:
        logits = typical_filter(logits, options.typical_mass)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def decode(decoder, cache, prompt_length, logits, options, generator, progress=None):
    """B candidates from the prompt's logits [B, vocab] through `cache` until all stop -> tokens [B, steps],
    stop-padded."""
    c, steps = decoder.config, options.max_new_tokens
    B, device = logits.shape[0], logits.device
    tokens = torch.full((B, steps), c.stop_token, dtype=torch.long, device=device)
    seen = torch.zeros(B, c.speech_vocab_size, dtype=torch.bool, device=device)
    seen[:, c.start_token] = True
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for k in range(steps):
        check_overflow(logits)                                            # inf or NaN: no token can be drawn
        logits[:, c.start_token] = -math.inf                              # never start again
        token = next_tokens(logits, seen, options, generator).masked_fill(done, c.stop_token)
        tokens[:, k] = token
        seen.scatter_(1, token[:, None], True)
        done |= token == c.stop_token
        if progress:
            progress.decode(k, B, int((~done).sum()))
        if done.all() or k == steps - 1:
            break
        logits = decode_step(decoder, token, k + 1, cache, prompt_length)
    return tokens[:, :k + 1]


def join(batches, stop_token):
    """Batches of tokens [B_i, steps_i] -> one [sum B_i, longest], the shorter ones stop-padded."""
    longest = max(b.shape[1] for b in batches)
    return torch.cat([F.pad(b, (0, longest - b.shape[1]), value=stop_token) for b in batches])


def trim(tokens, stop_token):
    """[N, T] -> up to the first step at which every candidate had stopped: the same length whichever
    batches the candidates were decoded in (a batch stops when its own last candidate stops)."""
    everyone = (tokens == stop_token).all(dim=0)
    return tokens[:, :int(everyone.int().argmax()) + 1] if everyone.any() else tokens


def fix_candidates(tokens, stop_token, pad_to=None):
    """Tortoise's fix_autoregressive_output on [N, T]: from the first stop token on, codes become 83 and
    the last three 45, 45, 248; a candidate that never stopped is left alone. With pad_to, candidates are
    first stop-padded to that length, as Tortoise's api.py does: that changes which codes the 45, 45, 248
    tail overwrites (it lands at the end of the padded length), not which candidates are fixed."""
    if pad_to is not None:
        tokens = F.pad(tokens, (0, pad_to - tokens.shape[1]), value=stop_token)
    N, T = tokens.shape
    is_stop = tokens == stop_token
    stopped = is_stop.any(dim=1)
    first = torch.where(stopped, is_stop.int().argmax(dim=1), T)
    fixed = tokens.masked_fill(torch.arange(T, device=tokens.device) >= first[:, None], FIX_STOP_CODE)
    tail = torch.tensor(FIX_TAIL[-min(3, T):], device=tokens.device)
    fixed[stopped, -len(tail):] = tail
    return fixed, first


def rank(model, text_ids, tokens, options, progress=None):
    """One text's raw ids [T] and its candidates [N, steps] -> fixed, scored by CLVP and ranked: a Generation."""
    o = options
    candidates, lengths = fix_candidates(tokens, model.config.decoder.stop_token,
                                         o.max_new_tokens if o.pad_to_max else None)
    text_features = model.text_features(text_ids[None])                     # once, for every batch
    scores = []
    for i in range(0, len(candidates), o.batch_size):
        scores.append(model.score(text_features, model.speech_features(candidates[i:i + o.batch_size]))[0])
        if progress:
            progress.rerank(i + len(scores[-1]), len(candidates))
    scores = torch.cat(scores)
    check_overflow(scores)                                                  # NaN scores cannot be ranked
    order = scores.argsort(descending=True)
    return Generation(candidates, lengths, scores, order, candidates[order[:o.keep]])


@torch.inference_mode()
def generate_and_rank(model, text_ids, mels, options, progress=None):
    """One text's raw ids [T], in the voice of mels [C, 80, frames] -> options.num_candidates candidates,
    fixed, scored and ranked: a Generation. progress: None, or an object with decode(step, batch_size,
    running) and rerank(done, total)."""
    dec, o = model.decoder, options
    prompt = dec.prompt(model.voice_latent(mels)[None], text_ids[None])     # [1, P, D]
    P = prompt.shape[1]
    prompt_cache = KVCache.empty(dec.config, 1, P + o.max_new_tokens, prompt.device, prompt.dtype)
    first_logits = prefill(dec, prompt, prompt_cache)                        # [1, vocab]
    generator = torch.Generator(prompt.device).manual_seed(o.seed) if o.seed is not None else None
    batches = []
    for first in range(0, o.num_candidates, o.batch_size):
        rows = min(o.batch_size, o.num_candidates - first)
        batches.append(decode(dec, prompt_cache.repeat(rows), P, first_logits.repeat(rows, 1), o, generator,
                              progress))
    tokens = trim(join(batches, dec.config.stop_token), dec.config.stop_token)
    return rank(model, text_ids, tokens, o, progress)


# ---------------------------------------------------------------------------------------------------
# Loading: one file holds config, weights, tokenizer and mel norms
#
# convert_weights.py writes it from official checkpoints (save_checkpoint, in Part III). It is a
# safetensors file: raw tensors and a JSON header, read by a few lines of Part III, so a checkpoint can
# never run code; the header is checked whole before a tensor is read, and the numbers before the model
# is built. A model without a tokenizer or mel norms of its own (--random-init, train.py's) gets the
# ones shipped in data/, which are Tortoise's.
# ---------------------------------------------------------------------------------------------------

FORMAT_VERSION = 2                                   # 1 was a torch.save pickle
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")                    # Tortoise's tokenizer.json and mel norms
SHIPPED = [os.path.join(DATA, "tokenizer.json"), os.path.join(DATA, "mel_norms.safetensors")]


def default_checkpoint():
    """$CLVP_CACHE/clvp.pt or ~/.cache/clvp/clvp.pt: where convert_weights.py --download writes it."""
    return os.path.join(os.environ.get("CLVP_CACHE") or os.path.expanduser("~/.cache/clvp"), "clvp.pt")


def load_model(path, device=None):
    """Read a converted checkpoint -> DecoderAndCLVP in eval mode, fp32, on `device` (CUDA when present)."""
    device, (config, weights, tokenizer, mel_norms) = resolve_device(device), read_checkpoint(path)
    with torch.device("meta"):                               # no memory, no random init: weights come next
        model = DecoderAndCLVP(config)
    model.load_state_dict(weights, assign=True)
    model.tokenizer, model.mel_norms = tokenizer, mel_norms
    return add_front_end(model).to(device=device, dtype=torch.float32).eval()


def add_front_end(model):
    """The shipped tokenizer and mel norms (Tortoise's own), for a model whose checkpoint holds none."""
    if model.tokenizer is None:
        model.tokenizer = Tokenizer.from_file(SHIPPED[0])
    if model.mel_norms is None:
        model.mel_norms = read_mel_norms(SHIPPED[1])
    return model


# ---------------------------------------------------------------------------------------------------
# Putting it together: sentences and reference clips in, ranked candidates out
#
# The command line and code that imports clvp both come here. A sentence becomes ids, the clips become
# one batch of log-mels (the first 6 s of each), and generate samples and ranks each sentence's
# candidates.
# ---------------------------------------------------------------------------------------------------

def encode_text(model, text):
    """A sentence -> raw ids [T] on the model's device."""
    check_text(model, text)                  # not empty, cleans to something, at most 401 tokens (Part III)
    return torch.tensor(model.tokenizer.encode(text), dtype=torch.long, device=model.logit_scale.device)


def voice_mels(model, paths):
    """Reference clips of one voice -> mels [C, 80, frames]: the first 6 s of each (all that is read), padded
    to 6 s, in the model's dtype."""
    device, dtype = model.logit_scale.device, model.logit_scale.dtype
    wavs = [format_conditioning(load_audio(path, seconds=CONDITIONING_SAMPLES / SAMPLE_RATE)) for path in paths]
    return torch.stack([log_mel_spectrogram(w.to(device), model.mel_norms) for w in wavs]).to(dtype)


def speech_tokens(model, texts, clips, options=None, progress=None):
    """Sentences and reference clips of one voice -> a ranked Generation for each sentence:
    speech_tokens(model, ["Hello there."], ["voice.wav"], DecodingOptions(num_candidates=16))."""
    return model.generate([encode_text(model, t) for t in texts], voice_mels(model, clips), options, progress)


# ===================================================================================================
# Part II: the engine. Part I's generation, fast, with the same numbers
#
# It computes what the lesson's generate_and_rank computes (logits within 1e-5 in fp32, the same greedy
# tokens and scores: test_clvp.py runs both) with five ideas, a section each: the dtype rules, the shared
# prompt read once per text, each row's own steps in contiguous blocks, weights packed for oneDNN, and
# several texts decoded together. Everything else is the lesson's: the networks, the samplers, decode,
# fix_candidates, rank. The command line runs the engine (--engine fast, the default); --engine lesson
# runs Part I's generation instead, and the library takes the same choice (DecodingOptions.engine).
# Figures: an AMD EPYC with AVX-512 BF16, 2 cores (the README has the tables, bench.py makes them).
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# Dtypes: bf16 only where this machine has the kernels for it
#
# On a CPU, bf16 is fast only with the instructions for it. Without AVX-512 BF16 (an AVX2 CPU) bf16
# matrix products are emulated, so the KV cache and a step's attention stay fp32; without AMX, torch's
# bf16 scaled_dot_product_attention is about 5x slower than its fp32 one (bench.py --attention), so the
# prefill's attention runs in fp32. fp16 on a CPU is never the fast choice. The cost: an fp32 cache is
# twice the memory of a bf16 one. --cache-dtype forces the cache's dtype.
# ---------------------------------------------------------------------------------------------------

def attention_dtype(device, dtype):
    """The dtype the prefill's scaled_dot_product_attention runs in: the model's own, except fp32 on a CPU,
    where only AMX makes torch's bf16 kernel faster than its fp32 one."""
    fast = torch.device(device).type != "cpu" or dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()
    return dtype if fast else torch.float32


def cache_dtype(device, dtype, forced=None):
    """The dtype of the engine's KV caches and of a decode step's attention: `forced` (a dtype's name) where
    given; else the model's own, but fp32 on a CPU for fp16, and for bf16 without AVX-512 BF16."""
    fast = torch.device(device).type != "cpu" or dtype == torch.bfloat16 and torch.cpu._is_avx512_bf16_supported()
    return getattr(torch, forced) if forced else dtype if fast else torch.float32


# ---------------------------------------------------------------------------------------------------
# The shared prompt, read once per text
#
# The lesson copies the prompt's keys and values into every row of a batch, and a step reads each copy.
# Here they are stored once per text (PromptCache), and a step meets all the rows' queries with them in
# one matrix product, then each row with its own steps in a batched one; the two parts' scores go through
# one softmax, which is the exact merge that cascade (shared-prefix) attention makes with log-sum-exp in
# FlashInfer and Hydragen. Saves: at L = 100 a bf16 step reads 99 MiB of cache instead of 178, and the
# memory that holds it. Costs: the two products and the merge are more code than one attention call.
# ---------------------------------------------------------------------------------------------------

class PromptCache:
    """Keys and values of each text's prompt, once per text however many candidates decode it:
    [layers, heads, texts, positions, head_dim], filled by one prefill of all the texts together.

    Prompts of different lengths are left-padded to the longest: pads [texts] counts each one's padding.
    `visible` [texts, positions] marks the real positions, and the prefill's mask [texts, 1, P, P] is
    causal without the padding, except that a padding position sees itself (no softmax row is empty).
    """

    def __init__(self, c: DecoderConfig, texts, length, device, dtype, pads=None):
        shape = (c.layers, c.heads, texts, length, c.dim // c.heads)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        pads = torch.zeros(texts, dtype=torch.long, device=device) if pads is None else pads
        self.visible = torch.arange(length, device=device) >= pads[:, None]
        causal, eye = (torch.ones(length, length, dtype=torch.bool, device=device).tril(),
                       torch.eye(length, dtype=torch.bool, device=device))
        self.mask = self.visible[:, None, None] & causal | eye if bool(pads.any()) else None

    def attend(self, layer, q, k, v, start=0):
        """The prefill: q, k, v [texts, heads, positions, hd] of whole prompts -> [texts, heads, positions, hd]."""
        self.k[layer], self.v[layer] = k.transpose(0, 1), v.transpose(0, 1)
        dtype = attention_dtype(q.device, q.dtype)
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=self.mask,
                                             is_causal=self.mask is None)
        return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# Each row's own steps, in contiguous blocks
#
# torch's CPU kernels copy any operand that is not contiguous before they use it, and a slice of a cache
# that grows along its positions never is. So a row's own keys and values are kept in blocks of BLOCK
# steps, [layers, blocks, rows * heads, BLOCK, head_dim], as vLLM's paged attention keeps them: the blocks
# filled so far are one contiguous slice, which a step reads as it lies, plus the unfilled rest of the
# last block, which the mask hides. Saves: at L = 400 a bf16 step took 127-144 ms, against 166-184 ms
# with a strided cache. Costs: up to 31 masked positions read per step, and in fp32 (where MKL does not
# copy) about a tenth at 500 positions.
# ---------------------------------------------------------------------------------------------------

class StepCache:
    """What a batch of decoding rows attends to: their texts' prompts, read from a PromptCache, and each
    row's own keys and values in blocks, allocated once per batch."""
    BLOCK = 32

    def __init__(self, prompts: PromptCache, texts, steps):
        """texts [B], ascending: the text each row decodes; steps: at most how many tokens each row makes."""
        layers, heads, _, P, head_dim = prompts.k.shape
        first, last = int(texts[0]), int(texts[-1]) + 1
        self.prompts, self.texts, self.prompt_length = prompts, slice(first, last), P
        shape = (layers, -(-steps // self.BLOCK), len(texts) * heads, self.BLOCK, head_dim)
        self.k = prompts.k.new_empty(shape)
        self.v = prompts.k.new_empty(shape)
        # [B, 1, those texts * positions]: the prompt positions each row may not see (other texts', padding)
        owner = torch.arange(first, last, device=texts.device).repeat_interleave(P)
        self.hidden = ((texts[:, None] != owner) | ~prompts.visible[first:last].flatten())[:, None]

    def attend(self, layer, q, k, v, start):
        """One new token per row at position `start`: q, k, v [B, heads, 1, hd] -> attention [B, heads, 1, hd],
        computed in the cache's dtype (softmax in fp32), back in k's."""
        (B, H, _, hd), dtype = q.shape, self.k.dtype
        step = start - self.prompt_length                   # this token's place among the row's own steps
        block = step // self.BLOCK
        if step % self.BLOCK == 0:                           # a fresh block: zeros, not leftover NaNs, in its rest
            self.k[layer, block], self.v[layer, block] = 0, 0
        self.k[layer, block, :, step % self.BLOCK] = k.reshape(B * H, hd)
        self.v[layer, block, :, step % self.BLOCK] = v.reshape(B * H, hd)
        prompt_k, prompt_v = (t[layer, :, self.texts].flatten(1, 2) for t in (self.prompts.k, self.prompts.v))
        own_k, own_v = (t[layer, :block + 1].flatten(0, 1) for t in (self.k, self.v))   # [blocks * B * H, BLOCK, hd]
        q = q.to(dtype) * hd ** -0.5
        to_prompts = q[:, :, 0].transpose(0, 1) @ prompt_k.transpose(1, 2)    # [H, B, n]: all rows, all prompts
        # keys @ query, not query @ keys^T, so that the keys too go in as they lie (not transposed).
        to_own = own_k @ q.reshape(1, B * H, hd, 1).expand(block + 1, -1, -1, -1).flatten(0, 1)
        to_own = to_own.view(block + 1, B, H, self.BLOCK).permute(1, 2, 0, 3).flatten(2)   # [B, H, steps so far]
        to_own[..., step + 1:] = -math.inf                                    # the last block's unfilled rest
        scores = torch.cat([to_prompts.transpose(0, 1).masked_fill(self.hidden, -math.inf), to_own], -1)
        w, n = scores.float().softmax(-1).to(dtype), prompt_k.shape[1]         # [B, H, n + blocks * BLOCK]
        from_prompts = (w[..., :n].transpose(0, 1) @ prompt_v).transpose(0, 1)   # [B, H, hd]
        w_own = w[..., n:].reshape(B * H, block + 1, self.BLOCK).transpose(0, 1).reshape(-1, 1, self.BLOCK)
        from_own = (w_own @ own_v).view(block + 1, B, H, hd).sum(0)             # each block's part, summed
        return (from_prompts + from_own)[:, :, None].to(k.dtype)                 # [B, H, 1, hd]


# ---------------------------------------------------------------------------------------------------
# Weights packed once for oneDNN
#
# torch's CPU Linear lays a bf16 weight out anew on every call, and runs fp32 through MKL; at a decode
# step's few rows both are slow. During a generation, on a CPU, each of the decoder's Linears is swapped
# for a PackedLinear, which multiplies with a copy of its weight packed once. Saves: at 16 rows the
# step's Linears over 30 layers take 41-50 ms instead of 106 in bf16, 89 ms instead of 247 in fp32.
# Costs: the copies, the weights' size in memory (the memory check counts them), and 0.5-0.7 s to make.
# ---------------------------------------------------------------------------------------------------

class PackedLinear(nn.Module):
    """An nn.Linear's forward, with its weight packed for oneDNN for `rows` rows at a time."""

    def __init__(self, linear, rows):
        super().__init__()
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight, rows)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(weight):
    """oneDNN packs fp32 everywhere and bf16 where this CPU has bf16 (AVX-512 BF16 or AMX) kernels."""
    return (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (weight.dtype == torch.float32 or weight.dtype == torch.bfloat16
                 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


@contextlib.contextmanager
def packed_weights(decoder, rows):
    """While it lasts, where can_pack, the decoder's nn.Linears are PackedLinears; they come back after."""
    parents = [decoder, *decoder.blocks] if can_pack(decoder.head.weight) else []
    linears = [(p, name, m) for p in parents for name, m in p.named_children() if isinstance(m, nn.Linear)]
    for parent, name, linear in linears:
        setattr(parent, name, PackedLinear(linear, rows))
    try:
        yield
    finally:
        for parent, name, linear in linears:
            setattr(parent, name, linear)


# ---------------------------------------------------------------------------------------------------
# Several texts decoded together
#
# The sentences of a --text-file (or a list given to generate) fill a batch together: their prompts are
# left-padded to the longest and masked (PromptCache), every row steps through the same positions, and a
# row reads only its own text's prompt (StepCache.hidden). Saves: at 16 candidates a sentence, rows that
# one text alone would leave empty; eight sentences took 110.9 s four to a batch against 181.0 s one at a
# time (fp32, before the shared prompt and the packing). Costs: the padding of the shorter prompts.
# ---------------------------------------------------------------------------------------------------

@torch.inference_mode()
def generate_together(model, text_ids, mels, options, progress=None):
    """generate_and_rank for a list of texts' raw ids [T_i], in one voice -> [Generation], one per text.
    Rows of all texts, text by text, decode together in batches of up to options.batch_size rows."""
    dec, c, o = model.decoder, model.config.decoder, options
    N, device = o.num_candidates, mels.device
    latent = model.voice_latent(mels)[None]                                  # [1, D]
    prompts = [dec.prompt(latent, ids[None])[0] for ids in text_ids]         # [P_i, D] each
    P = max(len(p) for p in prompts)
    pads = torch.tensor([P - len(p) for p in prompts], device=device)
    dtype = cache_dtype(device, latent.dtype, o.cache_dtype)
    shared = PromptCache(c, len(text_ids), P, device, dtype, pads)          # each prompt, once
    rows = torch.arange(len(text_ids), device=device).repeat_interleave(N)   # the text of each row
    generator = torch.Generator(device).manual_seed(o.seed) if o.seed is not None else None
    batches = []
    with packed_weights(dec, o.rows(len(text_ids))):
        first_logits = prefill(dec, torch.stack([F.pad(p, (0, 0, P - len(p), 0)) for p in prompts]), shared)
        for first in range(0, len(rows), o.batch_size):                     # one batch's cache at a time
            batch = rows[first:first + o.batch_size]
            batches.append(decode(dec, StepCache(shared, batch, o.max_new_tokens), P, first_logits[batch], o,
                                  generator, progress))
    tokens = join(batches, c.stop_token)
    return [rank(model, ids, trim(tokens[i * N:(i + 1) * N], c.stop_token), o, progress)
            for i, ids in enumerate(text_ids)]


# ===================================================================================================
# Part III: the boundaries. Everything a user hands in (command-line values, files, checkpoints, the
# arguments of the public functions) is checked here, completely, before any work and before any
# allocation whose size it sets; and every file is written whole or not at all. Part I calls into this
# part in one line where input enters; the networks assume valid tensors and check nothing.
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# Errors, limits, and the one way to write a check
#
# Every mistake a user can make is an InputError (a ValueError, so code that imports clvp can catch
# either) whose message names the input and the problem; the command lines print it as one line with
# exit code 2. A check is a list of (ok, message) rules for require. Where a message needs the name the
# user knows (a flag, a file), the caller adds it with `prefixed`, rather than catching and rewording.
# ---------------------------------------------------------------------------------------------------

class InputError(ValueError):
    """Something a user handed in cannot be used; the message names it."""


class UsageError(InputError):
    """A bad command-line value."""


class AudioError(InputError):
    """A problem with the user's audio (bad file, bad values)."""


class CheckpointError(InputError):
    """A checkpoint file that cannot be used."""


@contextlib.contextmanager
def prefixed(prefix, kind=None):
    """An InputError raised inside the block gets `prefix` before its message, and becomes `kind` if given:
    with prefixed(f"{path}: ", CheckpointError): check_checkpoint(blob)."""
    try:
        yield
    except InputError as e:
        raise (kind or type(e))(prefix + str(e)) from None


def require(rules, error=InputError, prefix=""):
    """Raise error(prefix + message) for the first (ok, message) rule that does not hold."""
    for ok, message in rules:
        if not ok:
            raise error(prefix + message)


def within(flag, value, low, high):
    """A rule for require: low <= value <= high, said in the flag's words."""
    return low <= value <= high, f"{flag} must be in {low}..{high}, not {value}"


def first_line(error):
    """An exception as a short, single line for an error message."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def describe(x):
    """How an argument looks, for an error message: 'a tensor [2, 80] of torch.float32' or 'a list'."""
    if not isinstance(x, torch.Tensor):
        return f"a {type(x).__name__}"
    return f"a tensor {list(x.shape)} of {x.dtype}" + ("" if plain(x) else f" ({x.layout}, on {x.device})")


def plain(t):
    """A tensor whose numbers are there to read: dense, in memory (not sparse, not on the meta device)."""
    return t.layout == torch.strided and t.device.type != "meta"


def all_finite(t):
    """No NaN and no infinity in t. The sum is a fast test that only an overflow can fail falsely."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


MAX_LAYERS, MAX_SIZE = 1024, 2**20   # far beyond any real CLVP; a hostile config cannot build a huge model
MAX_CANDIDATES = 1024                # per text: 4x Tortoise's largest preset (256); each costs a decoding
MAX_CLIPS = 256                      # --audio clips of one voice (Tortoise's voices have a handful)
MAX_LOGIT_SCALE = math.log(1e4)      # scores up to 10^4 x cosine: CLIP clamps at ln 100, fp16 holds 65504
MIN_MEL_NORM = 1e-3                  # smaller divisors make log-mels of 10^4 and more (Tortoise's: -9.5..-1.6)
MAX_TEXT_BYTES = 2**20               # --text-file: a book chapter; more is a mistake
MAX_JSON_BYTES = 16 * 2**20          # a config or tokenizer file; Tortoise's tokenizer.json is 6 KiB
RATES = (1000, 384000)               # Hz a real recording uses; a header outside them is lying
MAX_CHANNELS = 64
SILENCE_PEAK = 1e-4                  # about -80 dBFS, a few 16-bit steps: treat as silence


# ---------------------------------------------------------------------------------------------------
# Configuration, tokenizer, mel norms
# ---------------------------------------------------------------------------------------------------

def check_config_dict(d):
    """A config as asdict writes it: every key present and known, every value an integer in range, and the
    sizes consistent (check_config)."""
    require([(isinstance(d, dict) and set(d) == set(CONFIG_PARTS), f"config must be a dict of exactly {sorted(CONFIG_PARTS)}")])
    for part, kind in CONFIG_PARTS.items():
        names, given = {f.name for f in fields(kind)}, set(d[part]) if isinstance(d[part], dict) else set()
        require([(isinstance(d[part], dict) and given == names,
                  f"config.{part}: missing {sorted(names - given)}, unknown {sorted(given - names)}")])
        for name, value in d[part].items():
            low, high = (0, MAX_SIZE) if name.endswith("token") else (1, MAX_LAYERS if "layers" in name
                                                                         or "blocks" in name else MAX_SIZE)
            require([(type(value) is int and low <= value <= high,
                      f"config.{part}.{name} must be an integer in {low}..{high}, not {value!r}")])
    check_config(Config(*(kind(**d[part]) for part, kind in CONFIG_PARTS.items())))


def check_config(config):
    """Sizes that fit together -> config, or an InputError saying which do not."""
    d, t, s = config.decoder, config.text, config.speech
    rules = [(d.dim % d.heads == 0, "decoder.heads must divide decoder.dim"),
             (max(d.start_token, d.stop_token) < d.speech_vocab_size and d.start_token != d.stop_token,
              "decoder.start_token and stop_token must be two different ids below speech_vocab_size"),
             (max(d.text_start_token, d.text_stop_token) < min(d.text_vocab_size, t.vocab_size),
              "decoder.text_start_token and text_stop_token must be below both text vocab sizes"),
             (d.text_positions >= 4 and d.speech_positions >= 3, "the decoder needs at least 4 text and 3 "
              "speech positions"),
             (d.mel_channels == N_MELS, f"decoder.mel_channels must be {N_MELS}, the log-mel bands"),
             (min({d.start_token, d.stop_token}) >= s.vocab_size >= d.speech_vocab_size - 2 and
              s.vocab_size > max(FIX_STOP_CODE, *FIX_TAIL), "speech.vocab_size must cover every code the "
              "decoder emits but its start and stop tokens (its last two ids)"),
             (t.projection_dim == s.projection_dim, "text and speech projection_dim must be equal")]
    for e, side in ((t, "text"), (s, "speech")):
        rules += [(e.dim % e.heads == 0, f"{side}.heads must divide {side}.dim"),
                  (e.rotary_dim % 2 == 0 and e.rotary_dim <= e.dim // e.heads,
                   f"{side}.rotary_dim must be even and at most a head's width ({e.dim // max(e.heads, 1)})")]
    require(rules, prefix="config: ")
    return config


def check_tokenizer(vocab, merges):
    """Ids are distinct integers >= 0, the special tokens are there, and each merge joins two tokens of the
    vocabulary into a third."""
    require([(isinstance(vocab, dict) and all(isinstance(t, str) and type(i) is int and i >= 0 for t, i in vocab.items()),
              "tokenizer: the vocabulary must map tokens to integer ids >= 0")])
    require([(len(set(vocab.values())) == len(vocab) and {'[UNK]', '[SPACE]'} <= set(vocab),
              "tokenizer: the vocabulary needs distinct ids and the tokens [UNK] and [SPACE]")])
    for m in merges if isinstance(merges, (list, tuple)) else [None]:
        require([(isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(t, str) for t in m)
                  and {m[0], m[1], m[0] + m[1]} <= vocab.keys(),
                  f"tokenizer: merge {m!r:.80} is not two tokens of the vocabulary that make a third")])


def check_mel_norms(norms, name="mel_norms"):
    """The log-mel's per-band divisors: a tensor of N_MELS finite floats, none nearer 0 than MIN_MEL_NORM."""
    require([(isinstance(norms, torch.Tensor) and norms.shape == (N_MELS,) and norms.is_floating_point() and
              plain(norms) and all_finite(norms) and bool((norms.abs() >= MIN_MEL_NORM).all()),
              f"{name} must be {N_MELS} finite non-zero divisors, at least {MIN_MEL_NORM:g} in size, not "
              f"{describe(norms)}")])


# ---------------------------------------------------------------------------------------------------
# Input files: one opener for every file a run reads, each read with a bound
#
# open_input is the only way the project opens a file to read: a regular file, checked on the open file
# itself (so a file swapped after the check is never read), handed on as a file object. soundfile then
# reads the format from the header, never from the name: '-' is not standard input, 'x.raw' is not a
# headerless format, and a name that is not UTF-8 is just a name. quiet_c_stderr keeps a C library's
# own notes off stderr.
# ---------------------------------------------------------------------------------------------------

def open_input(path, error=InputError):
    """A file to read -> its binary file object, or error naming it. A FIFO or a device (which could block
    forever, or never end) opens without blocking and is refused before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, ValueError, TypeError) as e:           # a symlink loop, no permission, a NUL in the name
        raise error(f"{path}: {getattr(e, 'strerror', None) or first_line(e)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        require([(not stat.S_ISDIR(mode), f"{path}: is a directory, not a file"),
                 (False, f"{path}: not a regular file (a FIFO, device or socket)")], error)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_input_file(path, error=InputError):
    """Before any work: `path` is a file open_input will read."""
    open_input(path, error).close()


def read_json(path, error=InputError):
    """A JSON object from a file a user named: a regular file of at most MAX_JSON_BYTES, or an error naming it."""
    with open_input(path, error) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    require([(len(data) <= MAX_JSON_BYTES, f"{path}: more than {MAX_JSON_BYTES // 2**20} MiB, too big for JSON here")],
            error)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:                # not JSON, not UTF-8, or nested too deeply
        raise error(f"{path}: not readable JSON ({first_line(e)})") from None
    require([(isinstance(value, dict), f"{path}: not a JSON object")], error)
    return value


@contextlib.contextmanager
def quiet_c_stderr():
    """Inside the block, what C code writes to file descriptor 2 (libmpg123's 'Note: Trying to resync...')
    is dropped, so a refusal stays one line; Python's own messages come after the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(devnull)


def read_tokenizer_json(path):
    """Tortoise's tokenizer.json -> (vocab, merges), checked."""
    model = read_json(path).get("model")
    with prefixed(f"{path}: not a readable tokenizer.json: "):
        require([(isinstance(model, dict) and isinstance(model.get("merges"), list), "no model.vocab and model.merges")])
        merges = [m.split(' ') if isinstance(m, str) else m for m in model['merges']]
        check_tokenizer(model.get('vocab'), merges)
    return model['vocab'], merges


@contextlib.contextmanager
def open_audio(path, sampling_rate, seconds):
    """load_audio's soundfile.SoundFile(path), checked first: the arguments, the file (open_input: a regular
    file, read through the descriptor that was checked), a header within RATES and MAX_CHANNELS, and a read
    that fits in memory (a header can claim any length; with `seconds`, only those are read). A file that
    soundfile cannot decode, here or while load_audio reads it, is an AudioError naming it, and
    libsndfile's own notes stay off stderr."""
    require([(isinstance(sampling_rate, int) and RATES[0] <= sampling_rate <= RATES[1],
              f"sampling_rate must be an integer in {RATES[0]}..{RATES[1]} Hz, not {sampling_rate!r}"),
             (seconds is None or isinstance(seconds, (int, float)) and 0 < seconds < 2**31 / RATES[1],
              f"seconds must be None or a positive number of seconds, not {seconds!r}")], AudioError)
    try:  # float32 reads: soundfile scales int16/int32 PCM to [-1, 1)
        with open_input(path, AudioError) as file, quiet_c_stderr(), soundfile.SoundFile(file) as f:
            sr, channels = f.samplerate, f.channels
            require([(RATES[0] <= sr <= RATES[1] and 1 <= channels <= MAX_CHANNELS,
                      f"{path}: {sr} Hz with {channels} channel(s); clvp.py reads {RATES[0]}..{RATES[1]} Hz with "
                      f"1..{MAX_CHANNELS} channels")], AudioError)
            frames = f.frames if seconds is None else min(f.frames, math.ceil((seconds + MARGIN) * sr))
            free, need = free_memory(torch.device("cpu")), 8 * frames * channels   # float32 samples, and a mean
            require([(free is None or need <= free / 2, f"{path}: its header claims {need / 2**30:.1f} GiB of "
                      f"samples, more than half the {(free or 0) / 2**30:.1f} GiB free")], AudioError)
            yield f
    except (soundfile.SoundFileError, RuntimeError) as e:
        raise AudioError(f"{path}: not a readable audio file ({first_line(getattr(e, 'error_string', e))})") from None


def check_clip(path, wav, sampling_rate):
    """load_audio's samples [n] before they are clipped to [-1, 1]: some, all finite, enough for the STFT; a
    silent clip is worth a warning."""
    require([(len(wav), f"{path}: audio file is empty (0 samples)"),
             (np.isfinite(wav).all(), f"{path}: audio contains NaN or Inf samples"),
             (len(wav) >= MIN_SAMPLES, f"{path}: too short (only {len(wav)} samples at {sampling_rate} Hz; need at "
              f"least {MIN_SAMPLES})")], AudioError)
    if np.abs(wav).max() < SILENCE_PEAK:
        warnings.warn(f"{path}: audio is silent; conditioning on silence is meaningless")


def check_wav(wav, mel_norms):
    """log_mel_spectrogram's arguments: fp32/fp64 samples (what torch.stft takes), long enough, and mel norms."""
    require([(isinstance(wav, torch.Tensor) and plain(wav) and wav.dtype in (torch.float32, torch.float64)
              and wav.dim() in (1, 2) and wav.shape[0] > 0,
              f"wav must be floats [samples] or [batch, samples], float32 or float64, not {describe(wav)}"),
             (wav.shape[-1] >= MIN_SAMPLES, f"audio too short for the STFT: {wav.shape[-1]} samples, need at least "
              f"{MIN_SAMPLES}")], AudioError)
    if mel_norms is not None:
        check_mel_norms(mel_norms)


# ---------------------------------------------------------------------------------------------------
# Tensors, decoding options, memory and devices: the model's methods' arguments
# ---------------------------------------------------------------------------------------------------

def checked_ids(ids, name, vocab_size, device, max_len=None, min_len=1):
    """Token ids [B, T] with min_len <= T <= max_len, each in 0..vocab_size-1 -> long ids on `device`."""
    require([(isinstance(ids, torch.Tensor) and plain(ids) and ids.dim() == 2 and ids.shape[0] >= 1
              and not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
              and min_len <= ids.shape[1] <= (max_len or math.inf),
              f"{name} must be integer ids [batch, {min_len}..{max_len or 'any'} tokens], not {describe(ids)}")])
    values = ids.cpu().numpy()                   # numpy: torch has no min/max for uint16..uint64
    low, high = (int(values.min()), int(values.max())) if ids.numel() else (0, 0)   # as ints: uint8 cannot hold 256
    require([(0 <= low and high < vocab_size, f"{name} must be ids in 0..{vocab_size - 1}, not {low}..{high}")])
    return ids.to(device=device, dtype=torch.long)


def checked_mels(mels, model):
    """Log-mel spectrograms [clips, 80, frames] of finite floats -> on the model's device and dtype."""
    channels = model.config.decoder.mel_channels
    require([(isinstance(mels, torch.Tensor) and plain(mels) and mels.is_floating_point() and mels.dim() == 3 and
              mels.shape[1] == channels and 0 not in mels.shape,
              f"mels must be floats [clips, {channels}, frames], not {describe(mels)}")])
    require([(all_finite(mels), "mels hold NaN or infinite values")])
    return mels.to(model.logit_scale)


def decoder_text_ids(model, text_ids):
    """Raw text ids [B, T] checked against the decoder's text table, with room for [start] ... [stop, stop]."""
    c = model.config.decoder
    return checked_ids(text_ids, "text_ids", c.text_vocab_size, model.logit_scale.device, c.text_positions - 3)


def checked_teacher_forcing(model, text_ids, speech_ids):
    """speech_logits' ids -> (text ids [1 or B, T], speech ids [B, S]) on the model's device."""
    c = model.config.decoder
    speech_ids = checked_ids(speech_ids, "speech_ids", c.speech_vocab_size, model.logit_scale.device,
                             max_len=c.speech_positions - 2, min_len=0)   # the last one sits at position max
    text_ids = decoder_text_ids(model, text_ids)
    require([(len(text_ids) in (1, len(speech_ids)), f"text_ids has {len(text_ids)} rows and speech_ids "
              f"{len(speech_ids)}: give one text row, or one per speech row")])
    return text_ids, speech_ids


OVERFLOW = ("the model's numbers overflowed (inf or NaN): its weights are too large for this dtype (try "
            "--dtype float32, or check the checkpoint)")
FP32_POSITIVE = "a finite positive number that float32 holds (1e-45..3e38)"


def check_text(model, text):
    """encode_text's sentence: a string, not empty, that clean_text can read, of at most the tokens the decoder
    reads. The length is bounded from the cleaned text before the BPE runs, so a huge 'word' is refused at once."""
    require([(isinstance(text, str), f"a text must be a string, not {describe(text)}")])
    require([(text.strip(), "the text is empty")])
    try:
        cleaned = clean_text(text)
    except ValueError as e:                                  # a number of over 36 digits, or '$,5'
        raise UsageError(f"cannot read the text {text[:40]!r}: {first_line(e)}") from None
    require([(cleaned.strip(), f"the text {text[:40]!r} is empty after cleaning")])
    limit = model.config.decoder.text_positions - 3           # room for the text start and two stops
    fewest = math.ceil(len(cleaned) / max(map(len, model.tokenizer.vocab)))   # a token spans this many at most
    ids = model.tokenizer.encode(text) if fewest <= limit else []
    require([(fewest <= limit and len(ids) <= limit, f"the text {text[:40]!r} is {len(ids) or f'at least {fewest}'} "
              f"tokens long; the model reads at most {limit}: cut it into shorter parts with '|'")])


def check_overflow(t):
    """A step's logits or a text's scores: inf or NaN there means the weights overflowed the dtype."""
    require([(all_finite(t), OVERFLOW)])


CACHE_DTYPES = (None, "float32", "bfloat16", "float16")
ENGINES = ("fast", "lesson")


def decoding_problems(o, config):
    """[(field, what is wrong)] for each DecodingOptions value that generation cannot work with on this config."""
    def number(x, low=0.0, high=math.inf):       # in range, and still the same number in the sampler's fp32:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not low <= x <= high or abs(x) > 1e300:
            return False                             # (1e-300 would be 0 there, and 1e39 infinite)
        return x == 0 or 0 < abs(torch.tensor(float(x), dtype=torch.float32).item()) < math.inf

    def integer(x, low, high):
        return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high
    longest = config.decoder.speech_positions - 1        # the last token fed back sits at position max
    rules = [("num_candidates", integer(o.num_candidates, 1, MAX_CANDIDATES), f"an integer in 1..{MAX_CANDIDATES}"),
             ("batch_size", integer(o.batch_size, 1, MAX_SIZE), f"an integer in 1..{MAX_SIZE}"),
             ("max_new_tokens", integer(o.max_new_tokens, 1, longest), f"an integer in 1..{longest}"),
             ("temperature", number(o.temperature), f"0 (greedy) or {FP32_POSITIVE}"),
             ("top_p", number(o.top_p, 0.0, 1.0) and o.top_p > 0, "in (0, 1]"),
             ("repetition_penalty", number(o.repetition_penalty) and o.repetition_penalty > 0, FP32_POSITIVE),
             ("typical_mass", o.typical_mass is None or number(o.typical_mass, 0.0, 1.0) and o.typical_mass > 0,
              "None (off) or in (0, 1]"),
             ("sample_top_k", o.sample_top_k is None or integer(o.sample_top_k, 1, config.decoder.speech_vocab_size),
              f"None (off) or an integer in 1..{config.decoder.speech_vocab_size}"),
             ("keep", integer(o.keep, 1, MAX_SIZE), f"an integer in 1..{MAX_SIZE}"),
             ("seed", o.seed is None or integer(o.seed, 0, 2**64 - 1), "None or an integer in 0..2**64-1"),
             ("pad_to_max", isinstance(o.pad_to_max, bool), "True or False"),
             ("engine", o.engine in ENGINES, f"one of {', '.join(ENGINES)}"),
             ("cache_dtype", o.cache_dtype in CACHE_DTYPES, f"None or one of {', '.join(CACHE_DTYPES[1:])}"),
             ("cache_dtype", o.cache_dtype not in CACHE_DTYPES[1:] or o.engine != "lesson",
              "unset with the lesson's engine (its cache is in the model's dtype)")]
    return [(name, f"must be {allowed}, not {getattr(o, name)!r}") for name, ok, allowed in rules if not ok]


def check_options(options, config, name=lambda field: field):
    """Every problem of the options in one InputError; name(field) says a field in the caller's words."""
    problems = decoding_problems(options, config)
    require([(not problems, "; ".join(f"{name(field)} {why}" for field, why in problems))])


def checked_generate_args(model, text_ids, mels, options, overrides):
    """generate's arguments -> (raw ids [T] of each text, mels, options), or an InputError; a request that
    does not fit in memory is refused before anything is allocated. top_k, keep's old name, is still taken."""
    said = {"keep": "top_k"} if "top_k" in overrides else {}          # name keep as the caller did
    overrides = {"keep" if name == "top_k" else name: value for name, value in overrides.items()}
    names = {f.name for f in fields(DecodingOptions)}
    require([(options is None or isinstance(options, DecodingOptions), f"options must be a DecodingOptions, not "
              f"{describe(options)}"), (set(overrides) <= names, f"unknown options {sorted(set(overrides) - names)}")])
    options = replace(options or DecodingOptions(), **overrides)
    check_options(options, model.config, lambda field: said.get(field, field))
    several = isinstance(text_ids, (list, tuple))
    require([(not several or text_ids and all(isinstance(t, torch.Tensor) for t in text_ids),
              f"text_ids must be integer ids [T] or [1, T], or a non-empty list of them, not {text_ids!r:.60}")])
    ids = [decoder_text_ids(model, t[None] if isinstance(t, torch.Tensor) and t.dim() == 1 else t)
           for t in (text_ids if several else [text_ids])]
    require([(all(len(t) == 1 for t in ids), "generate takes one text per tensor, [T] or [1, T]: give several texts "
              "as a list")])
    check_memory(model, max(t.shape[1] for t in ids), options, len(ids))
    return [t[0] for t in ids], checked_mels(mels, model), options


def free_memory(device):
    """Bytes that can still be allocated on `device` (None where this system does not say): on the CPU, the
    smaller of what the system has available and what `ulimit -v` leaves this process."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            free = min(free, max(0, limit - used))
        return free
    except (OSError, StopIteration, ValueError):
        return None


def cache_bytes(c: DecoderConfig, rows, texts, prompt, steps, dtype):
    """Bytes of keys and values for `texts` prompts of `prompt` positions, once each, and `steps` own steps of
    each of `rows` rows: what the caches hold, and what a step at that length reads."""
    return 2 * c.layers * c.dim * (texts * prompt + rows * steps) * dtype.itemsize


def check_memory(model, text_len, options, texts=1):
    """Refuse, before allocating anything, a generation that will not fit: the KV caches, the packed copy of
    the decoder's weights (the engine's), plus the candidates' tokens, which live in several copies (batches,
    joined, padded, fixed, returned). text_len: the longest text's; texts: how many decode together."""
    c, o, device = model.config.decoder, options, model.logit_scale.device
    rows, prompt = o.rows(1 if o.engine == "lesson" else texts), model.decoder.prompt_length(text_len)
    if o.engine == "lesson":        # one text at a time: its prompt's row, and a batch of rows that copy it
        cache, packed = cache_bytes(c, rows + 1, 0, 0, prompt + o.max_new_tokens, model.logit_scale.dtype), 0
    else:                           # each text's prompt once, and one batch's own steps
        cache = cache_bytes(c, rows, texts, prompt, o.max_new_tokens, cache_dtype(device, model.logit_scale.dtype,
                                                                                  o.cache_dtype))
        packed = sum(m.weight.nbytes for m in model.decoder.modules() if isinstance(m, nn.Linear)) * can_pack(
            model.decoder.head.weight)
    tokens = 6 * o.num_candidates * texts * o.max_new_tokens * 8 + 8 * rows * c.speech_vocab_size * 4
    free, need = free_memory(device), cache + packed + tokens
    each = f" for each of {texts} texts" if texts > 1 else ""
    require([(free is None or need <= 0.75 * free,      # the rest: activations, the model, the system
              f"{o.num_candidates} candidates{each} of up to {o.max_new_tokens} tokens in batches of {rows} need about "
              f"{need / 2**30:.1f} GiB (KV cache {cache / 2**30:.1f} GiB), more than 3/4 of the "
              f"{(free or 0) / 2**30:.1f} GiB free: ask for fewer candidates, a smaller batch or fewer tokens")])


def resolve_device(name=None):
    """'cpu', 'cuda', 'cuda:1' or None (CUDA when present) -> torch.device, or an InputError that says why not."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InputError(f"unknown device {name!r} (use cpu or cuda)") from None
    require([(device.type in ("cpu", "cuda"), f"unsupported device {name!r} (use cpu or cuda)"),
             (device.type != "cuda" or torch.cuda.is_available(),
              f"device {name!r} was asked for, but this torch sees no CUDA GPU")])
    return device


# ---------------------------------------------------------------------------------------------------
# Outputs: checked before any work, written whole
# ---------------------------------------------------------------------------------------------------

def project_files():
    """What a run may read by itself, besides the files it is given: the project's source and documents,
    and everything in data/ and examples/. No output may be one of them."""
    folders = [(HERE, (".py", ".md", ".txt")), (DATA, ""), (os.path.join(HERE, "examples"), "")]
    return [os.path.join(d, name) for d, ends in folders if os.path.isdir(d)
            for name in os.listdir(d) if name.endswith(ends)]


def check_output(path, inputs=()):
    """Before any work: `path` can be written (a file name in a directory that exists and is writable, and
    not a directory, device or anything but a regular file) and is none of the `inputs` nor of the
    project's own files, compared both as resolved paths and as files (hard links). An InputError says
    why not."""
    check_outputs([path], inputs)


def check_outputs(paths, inputs=()):
    """check_output for many paths (one per line of a --text-file): each source is resolved and each
    directory checked once, so 250,000 outputs take seconds, not minutes."""
    sources = {os.path.realpath(s): s for s in [*inputs, *project_files()] if os.path.exists(s)}
    files = {(st.st_dev, st.st_ino): s for s, st in ((s, os.stat(s)) for s in sources.values())}
    name_max = {}                                            # directory -> its longest file name
    for path in map(os.fspath, paths):
        require([(path and not path.endswith(("/", os.sep)), f"{path!r}: not a file name")])
        parent = os.path.dirname(os.path.abspath(path))
        if parent not in name_max:
            require([(os.path.isdir(parent), f"{path}: directory {parent} does not exist"),
                     (os.access(parent, os.W_OK | os.X_OK), f"{path}: directory {parent} is not writable")])
            name_max[parent] = os.pathconf(parent, "PC_NAME_MAX")
        require([(not os.path.isdir(path), f"{path}: is a directory"),
                 (not os.path.lexists(path) or os.path.isfile(path), f"{path}: exists and is not a regular file; "
                  "refusing to replace it"),
                 (len(os.fsencode(os.path.basename(path))) <= name_max[parent],
                  f"{path[:60]}...: file name too long")])
        source = sources.get(os.path.realpath(path))
        if source is None and os.path.exists(path):
            st = os.stat(path)
            source = files.get((st.st_dev, st.st_ino))
        require([(source is None, f"{path}: is also an input ({source}); refusing to write over it" if source in inputs
                  else f"{path}: is {source}, a file of this project; refusing to write over it")])


class RecordingFile:
    """A binary file that remembers why a write failed: numpy reports a full disk only as 'requested and
    written', soundfile as an AssertionError; this keeps the OSError that says why."""
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):                      # seek, tell, read (soundfile rewrites a WAV's header)
        return getattr(self.f, name)


def write_atomically(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it into place: the file appears
    whole or not at all, even on an error, a full disk or Ctrl-C. Only a regular file is ever replaced,
    and an error names `path`, not the temporary file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".clvp-", suffix=".tmp")
    except OSError as e:                                     # no inode left: the message names the user's path
        raise OSError(e.errno, e.strerror or first_line(e), path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            target, hook, swallowed = RecordingFile(f), sys.unraisablehook, []
            sys.unraisablehook = lambda report: swallowed.append(report.exc_value)   # soundfile's C callback
            try:                                             # swallows what it hits (a full disk, Ctrl-C) and
                write(target)                                # fails later with a vaguer error: raise the first
            except Exception:
                stop = [e for e in swallowed if not isinstance(e, Exception)]
                raise (stop[0] if stop else target.error or sys.exc_info()[1]) from None
            finally:
                sys.unraisablehook = hook
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                       # mkstemp makes it private; use the usual mode
        if os.path.lexists(path) and not os.path.isfile(path):
            raise FileExistsError(errno.EEXIST, "exists and is not a regular file; refusing to replace it", path)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError) and e.filename != path:
            raise OSError(e.errno, e.strerror or first_line(e), path) from None
        raise


# ---------------------------------------------------------------------------------------------------
# Tensor files: safetensors, read and written by hand
#
# clvp.pt, speak.pt and data/mel_norms.safetensors are safetensors files: 8 bytes giving the header's
# length, a JSON header {name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {key:
# text}}, then each tensor's raw little-endian bytes. Nothing in such a file can run, and every byte of
# it can be accounted for before one is read: the header is bounded, its names unique, its dtypes known,
# each shape fills exactly its byte range, and the ranges tile the rest of the file without a gap or an
# overlap, so the tensors never add up to more than the file. A caller's check then sees the header as a
# blob of tensors on the meta device (names, shapes, dtypes; no memory), and only a file it accepts is
# read, each tensor straight into its own memory.
#
# A blob is how the project holds such a file in memory: a tensor named "group.name" is blob[group][name]
# (clvp.pt's "weights", speak.pt's "diffusion" and "vocoder"), a name without a dot is blob[name], and
# each metadata entry is blob[key] as JSON (the format, its version, the config, the tokenizer).
# ---------------------------------------------------------------------------------------------------

TENSOR_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
MAX_HEADER_BYTES = 16 * 2**20    # an official clvp.pt's header, 778 tensors and the tokenizer, is 93 KiB
MAX_DIMS, MAX_DIM = 8, 2**31 - 1
OLD_FORMAT = b"PK\x03\x04"        # a zip archive: what torch.save wrote, before this format


def unique_keys(pairs):
    """json.loads' object_pairs_hook: an object whose names repeat is refused (json.loads would keep the last)."""
    seen = set()
    for name, _ in pairs:
        require([(name not in seen, f"the name {name!r} appears twice")], ValueError)
        seen.add(name)
    return dict(pairs)


def tensor_header(f, size):
    """The header of an open safetensors file of `size` bytes -> (metadata, [(start, end, name, dtype, shape)]
    sorted by start), checked whole; an InputError says what is wrong."""
    n = int.from_bytes(f.read(8), "little")
    require([(n <= MAX_HEADER_BYTES, f"a header of {n} bytes, over the {MAX_HEADER_BYTES // 2**20} MiB a tensor "
              "file's header may have"),
             (size >= 8 and 2 <= n <= size - 8, f"a header of {n} bytes in a file of {size}")])
    try:
        header = json.loads(f.read(n), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:               # not JSON, not UTF-8, nested too deeply, a name twice
        raise InputError(f"its header is not readable JSON ({first_line(e)})") from None
    require([(isinstance(header, dict), "its header is not a JSON object")])
    metadata = header.pop("__metadata__", {})
    require([(isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()),
              "__metadata__ is not an object of texts")])
    entries = []
    for name, info in header.items():
        ok = isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
        shape, offsets = (info["shape"], info["data_offsets"]) if ok else ([], [])
        require([(ok and info["dtype"] in TENSOR_DTYPES and isinstance(shape, list) and len(shape) <= MAX_DIMS and
                  all(type(d) is int and 0 <= d <= MAX_DIM for d in shape) and isinstance(offsets, list) and
                  len(offsets) == 2 and all(type(o) is int for o in offsets),
                  f"tensor {name!r}: not a known dtype ({', '.join(TENSOR_DTYPES)}), a shape of at most {MAX_DIMS} "
                  f"sizes under 2^31, and two data_offsets")])
        entries.append((*offsets, name, TENSOR_DTYPES[info["dtype"]], shape))
    end_of_last = 0
    entries.sort(key=lambda e: e[:2])
    for start, end, name, dtype, shape in entries:
        require([(start == end_of_last, f"tensor {name!r} starts at byte {start} of the data, not at "
                  f"{end_of_last} where the one before it ends (a gap or an overlap)"),
                 (end - start == math.prod(shape) * dtype.itemsize, f"tensor {name!r}: {dtype} {shape} is "
                  f"{math.prod(shape) * dtype.itemsize} bytes, not the {end - start} of its offsets")])
        end_of_last = end
    require([(end_of_last == size - 8 - n, f"its tensors end at byte {end_of_last} of the data, which holds "
              f"{size - 8 - n}")])
    return metadata, entries


def as_blob(metadata, tensors):
    """A header's metadata and {name: tensor} -> the blob (see above)."""
    blob, groups = {}, set()
    for key, text in metadata.items():
        try:
            blob[key] = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InputError(f"__metadata__ {key!r} is not JSON ({first_line(e)})") from None
    for name, t in tensors.items():
        group, _, rest = name.partition(".")
        require([(group not in blob or rest and group in groups, f"tensor {name!r} collides with the entry {group!r}")])
        if rest:
            groups.add(group)
            blob.setdefault(group, {})[rest] = t
        else:
            blob[name] = t
    return blob


def read_tensor_file(path, check, error=CheckpointError, view=as_blob):
    """A safetensors file a user names -> its blob, view(metadata, tensors). check(that view) sees the header
    alone first, its tensors on the meta device, and refuses the file with an InputError before any tensor
    memory is allocated. A torch.save file of an earlier clvp is refused with the command that rewrites it."""
    with open_input(path, error) as f, prefixed(f"{path}: ", error):
        size = os.fstat(f.fileno()).st_size
        require([(f.read(4) != OLD_FORMAT, "a file in the format before this one (a torch.save pickle, which clvp "
                  f"no longer reads); rewrite it once with: python convert_weights.py --upgrade {path}")])
        f.seek(0)
        try:
            metadata, entries = tensor_header(f, size)
            skeleton = view(metadata, {name: torch.empty(shape, dtype=dtype, device="meta")
                                       for _, _, name, dtype, shape in entries})
        except InputError as e:
            raise InputError(f"not a readable tensor file: {e}") from None
        check(skeleton)
        base, tensors = f.tell(), {name: torch.empty(shape, dtype=dtype) for _, _, name, dtype, shape in entries}
        with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            whole = pool.map(lambda e: read_exactly(f.fileno(), tensors[e[2]].view(-1).view(torch.uint8).numpy(),
                                                    base + e[0]), entries)
            require([(all(whole), "the file ended inside a tensor (was it changed while being read?)")])
        return view(metadata, tensors)


def read_exactly(fd, buffer, offset):
    """Fill `buffer` from file descriptor fd at `offset` -> False if the file ends first. read_tensor_file
    reads its tensors with these side by side: the copy and the page faults of fresh memory, not the disk,
    bound a read from the page cache (2.5 GB: 1.5 s on one thread, 0.85 s on two; AMD EPYC, 2 cores)."""
    view = memoryview(buffer).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            return False
        view, offset = view[n:], offset + n
    return True


def tensor_file_bytes(blob):
    """A blob -> (header bytes, [tensors in file order]): the inverse of as_blob and tensor_header."""
    metadata, tensors = {}, {}
    for key, value in blob.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{key}.{name}": t for name, t in value.items()})
        else:
            metadata[key] = json.dumps(value)
    header, offset = {"__metadata__": metadata}, 0
    dtype_names = {dtype: name for name, dtype in TENSOR_DTYPES.items()}
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                          # tensors start 8-byte aligned, as the format advises
    return len(text).to_bytes(8, "little") + text, list(tensors.values())


def write_tensor_file(path, blob):
    """Write a blob as a safetensors file, whole or not at all (write_atomically)."""
    header, tensors = tensor_file_bytes(blob)

    def write(f):
        f.write(header)
        for t in tensors:
            f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
    write_atomically(path, write)


# ---------------------------------------------------------------------------------------------------
# Weights and checkpoints
# ---------------------------------------------------------------------------------------------------

def expected_shapes(config):
    """{name: shape} of every weight of a CLVP with this config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: list(v.shape) for k, v in DecoderAndCLVP(config).state_dict().items()}


def check_weights(expected, weights, source, note=""):
    """expected: {name: shape}. Raise one CheckpointError naming every missing, unexpected or mis-shaped
    tensor of `weights`; `note` says where the expected shapes come from."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misfits = [f"{k} is {list(weights[k].shape)}, expected {list(shape)}" for k, shape in expected.items()
               if k in weights and list(weights[k].shape) != list(shape)]
    def some(names, sep=", ", most=8):                   # a file of 10^5 stray tensors still gets one short line
        return sep.join(names[:most]) + (f"{sep}and {len(names) - most} more" if len(names) > most else "")
    problems = [f"{len(missing)} tensor(s) missing: " + some(missing)] if missing else []
    problems += [f"{len(unexpected)} unexpected tensor(s): " + some(unexpected)] if unexpected else []
    problems += [f"{len(misfits)} tensor(s) of the wrong shape{note}: " + some(misfits, "; ")] if misfits else []
    require([(not problems, f"{source}: " + "; ".join(problems))], CheckpointError)


def check_checkpoint(blob):
    """What load_model relies on in clvp.pt's header, checked before a tensor is read: -> (config, weights,
    tokenizer or None, mel norms or None), or an InputError that names the key and the problem. The
    tensors may be on the meta device; checked_checkpoint looks at their numbers once they are read."""
    require([(blob.get("format") == "clvp", "not a clvp checkpoint (convert official weights with "
              "convert_weights.py)")])
    require([(type(blob.get("version")) is int and blob["version"] == FORMAT_VERSION,
              f"checkpoint format version {blob.get('version')!r}; this clvp.py reads version {FORMAT_VERSION}")])
    config, weights = Config.from_dict(blob.get("config")), blob.get("weights", {})
    require([(isinstance(weights, dict) and all(isinstance(t, torch.Tensor) for t in weights.values()),
              "weights: not a group of tensors")])
    check_weights(expected_shapes(config), weights, "weights")
    require([(t.is_floating_point(), f"weights: {name} must hold floating-point numbers, not {t.dtype}")
             for name, t in weights.items()])
    tokenizer, norms = blob.get("tokenizer"), blob.get("mel_norms")
    if tokenizer is not None:
        require([(isinstance(tokenizer, dict) and set(tokenizer) == {"vocab", "merges"},
                  "tokenizer: not an object of vocab and merges")])
        tokenizer = Tokenizer(tokenizer["vocab"], tokenizer["merges"])
        top = min(config.decoder.text_vocab_size, config.text.vocab_size)
        require([(max(tokenizer.vocab.values()) < top,
                  f"tokenizer: ids up to {max(tokenizer.vocab.values())}, but the text tables hold {top}")])
    require([(norms is None or isinstance(norms, torch.Tensor), "mel_norms: not a tensor")])
    return config, weights, tokenizer, norms


def check_finite(weights, source):
    """Every tensor of {name: tensor} holds finite numbers, or a CheckpointError names the first that does not."""
    require([(all_finite(t), f"{source}: {name} must hold finite numbers, not NaN or infinities")
             for name, t in weights.items()], CheckpointError)


def checked_checkpoint(blob):
    """clvp.pt's contents once read -> check_checkpoint's (config, weights, tokenizer or None, mel norms or
    None), the numbers checked too: finite weights, a logit scale whose exp fits, usable mel norms. Reading
    and writing a clvp.pt both end here."""
    config, weights, tokenizer, norms = check_checkpoint(blob)
    check_finite(weights, "weights")
    scale = float(weights["logit_scale"])
    require([(scale <= MAX_LOGIT_SCALE, f"weights: logit_scale {scale:g} is over ln(10^4) = {MAX_LOGIT_SCALE:.2f}; "
              "exp of it would overflow the scores")])
    if norms is not None:
        check_mel_norms(norms)
    return config, weights, tokenizer, norms


def read_checkpoint(path):
    """clvp.pt -> (config, weights, tokenizer or None, mel norms or None), or a CheckpointError naming the file."""
    blob = read_tensor_file(path, check_checkpoint)
    with prefixed(f"{path}: ", CheckpointError):
        return checked_checkpoint(blob)


def read_mel_norms(path):
    """data/mel_norms.safetensors: the one tensor mel_norms, [80] divisors, checked."""
    def check(blob):
        require([(set(blob) == {"mel_norms"}, "not a mel norms file: it must hold one tensor, mel_norms")])
    blob = read_tensor_file(path, check)
    with prefixed(f"{path}: ", CheckpointError):
        check_mel_norms(blob["mel_norms"])
    return blob["mel_norms"]


def save_checkpoint(path, config, weights, tokenizer=None, mel_norms=None, dtype=None):
    """Write config, weights (optionally cast to dtype), tokenizer and mel norms as clvp.pt, after the checks
    load_model makes: a file that this writes, load_model reads."""
    weights = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in weights.items()}
    blob = {"format": "clvp", "version": FORMAT_VERSION, "config": asdict(config), "weights": weights}
    if tokenizer is not None:
        blob["tokenizer"] = {"vocab": tokenizer.vocab, "merges": tokenizer.merges}
    if mel_norms is not None:
        blob["mel_norms"] = torch.as_tensor(mel_norms, dtype=torch.float32).contiguous()
    with prefixed("not written: ", CheckpointError):
        checked_checkpoint(blob)
    write_tensor_file(path, blob)


# ===================================================================================================
# Part IV: the command line. python clvp.py --text "..." --audio voice.wav
#
# The arguments are checked first (Part III's checks, in the flags' words), then the files, the model and
# every text, all before the first decoding step; each mistake is one line on stderr with exit code 2.
# A text is cut into parts of a few sentences (text_parts, in the appendix), each ranked on its own, as
# Tortoise's read.py speaks them. Each output is written whole as soon as its part is ranked (group by group
# when parts decode together), so an error or Ctrl-C never leaves a half-written file.
# ===================================================================================================



class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                                # one line, exit 2 (argparse adds a usage block)
        raise UsageError(message)


class Progress:
    """Generation's progress, rewritten in place on one line of stderr; silent when disabled."""
    def __init__(self, enabled):
        self.enabled, self.start, self.tokens = enabled, time.perf_counter(), 0

    def show(self, line):
        if self.enabled:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)

    def decode(self, step, batch_size, running):
        self.tokens += batch_size
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.show(f"decoding: step {step + 1}, {running}/{batch_size} candidates running, {rate:.0f} tokens/s")

    def rerank(self, done, total):
        self.show(f"reranking: {done}/{total} candidates scored")


def build_parser():
    p = ArgumentParser(prog="clvp.py", description="Sample speech-token candidates for a text in a reference "
                       "voice with Tortoise's decoder, and rank them with CLVP.")
    p.add_argument("--text", help="the text to speak, cut into parts of about 200 characters at sentence ends as "
                   "Tortoise's read.py cuts it, or at each '|' if it has one; each part is ranked on its own")
    p.add_argument("--text-file", metavar="FILE", help="one text per line, each cut into parts as --text is")
    p.add_argument("--audio", nargs="+", metavar="WAV", help="reference clip(s) of the voice")
    p.add_argument("--checkpoint", help="converted weights (default: $CLVP_CACHE or ~/.cache/clvp, clvp.pt; "
                   "python convert_weights.py --download puts them there)")
    p.add_argument("--random-init", action="store_true", help="random weights: watch the pipeline, ignore the scores")
    p.add_argument("--tiny", action="store_true", help="with --random-init: a small model instead of the official size")
    g = p.add_argument_group("sampling")
    g.add_argument("--candidates", dest="num_candidates", type=int, default=16, help="how many candidates to sample for each part (default 16)")
    g.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default 16); more than "
                   "--candidates decodes several parts at once")
    g.add_argument("--keep", "--top-k", type=int, default=1, help="how many of the best candidates to keep and "
                   "write (default 1)")
    g.add_argument("--seed", type=int, help="random seed, for repeatable candidates")
    g.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling mass (default 0.8)")
    g.add_argument("--repetition-penalty", type=float, default=2.0, help="default 2.0")
    g.add_argument("--typical-mass", type=float, help="typical sampling mass (off by default), applied after top-p "
                   "as transformers orders it (Tortoise's typical_sampling applies it before temperature)")
    g.add_argument("--sample-top-k", type=int, help="sample only among the K most likely tokens, after the "
                   "temperature and before top-p (off by default, as in api.py; api_fast.py samples with 50)")
    g.add_argument("--max-tokens", dest="max_new_tokens", type=int, default=500, help="speech tokens per candidate at most (default 500)")
    g.add_argument("--no-pad", dest="pad_to_max", action="store_false", help="score candidates unpadded (transformers) rather than "
                   "stop-padded to --max-tokens (Tortoise)")
    o = p.add_argument_group("running and output")
    o.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    o.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    o.add_argument("--engine", choices=ENGINES, default="fast", help="fast: Part II of clvp.py (default); lesson: "
                   "Part I's plain generation, the same numbers, slower")
    o.add_argument("--cache-dtype", choices=CACHE_DTYPES[1:], help="the KV cache's dtype (default: the model's, "
                   "except fp32 on a CPU without bf16 instructions; --explain says which)")
    o.add_argument("--out", default="best.npy", help="where to write the best tokens (default best.npy)")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    o.add_argument("--quiet", action="store_true", help="no progress display")
    o.add_argument("--explain", action="store_true", help="print every stage and the shape of every tensor")
    return p


def flag(field):
    """The flag that sets a DecodingOptions field (each flag's argparse destination is the field's name), with
    its other name where it has one: '--keep/--top-k'."""
    return next(("/".join(a.option_strings) for a in build_parser()._actions if a.dest == field), field)


def check_args(args):
    """Every mistake in the arguments themselves, named in one line before any work -> (device, options)."""
    require([((args.text is None) != (args.text_file is None), "give the text with exactly one of --text or --text-file"),
             (bool(args.audio), "give at least one reference clip with --audio"),
             (len(args.audio or ()) <= MAX_CLIPS, f"--audio: at most {MAX_CLIPS} clips of one voice, not "
              f"{len(args.audio or ())}"),
             (not args.tiny or args.random_init, "--tiny only applies with --random-init")], UsageError)
    options = DecodingOptions(**{f.name: getattr(args, f.name) for f in fields(DecodingOptions)})
    check_options(options, tiny_config() if args.tiny else Config(), flag)   # a checkpoint's own config: in run
    with prefixed("--device: "):
        return resolve_device(args.device), options


def prepare_model(args, device):
    """The model, its tokenizer and mel norms, on device in the asked dtype."""
    if args.random_init:
        torch.manual_seed(0)                                 # the same random model every run
        model = add_front_end(DecoderAndCLVP(tiny_config() if args.tiny else Config())).to(device).eval()
    else:
        path = args.checkpoint or default_checkpoint()
        if args.checkpoint is None and not os.path.exists(path):
            raise UsageError(f"no checkpoint at {path}: run `python convert_weights.py --download` to fetch and "
                             "convert the official weights, or pass --checkpoint PATH (--random-init --tiny runs "
                             "without weights)")
        model = load_model(path, device)
    return model.to(device=device, dtype=getattr(torch, args.dtype))


def read_lines(args):
    """--text as line 1, or the non-empty lines of --text-file (at most MAX_TEXT_BYTES of UTF-8), stripped
    -> [(line number from 1, text)]."""
    if args.text is not None:
        return [(1, args.text)]
    with open_input(args.text_file, UsageError) as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    require([(len(data) <= MAX_TEXT_BYTES, f"{args.text_file}: more than {MAX_TEXT_BYTES // 2**20} MiB of text; "
              "split it into files")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{args.text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [(n + 1, line.strip()) for n, line in enumerate(lines) if line.strip()]
    require([(lines, f"{args.text_file}: no text in it")])
    return lines


def read_parts(args):
    """The texts to rank -> [(part, the line it is from)]: each line of read_lines cut by text_parts. A line
    with nothing to say (only spaces and . , ; : ! ?, or only spaces and '|') gives no part, as split_text drops
    such parts of a text; no part at all is refused."""
    lines = read_lines(args)
    parts = [(part, n) for n, line in lines for part in text_parts(line)]
    where = f"the text {args.text[:40]!r}" if args.text is not None else f"{args.text_file}: the text"
    require([(args.text is None or args.text.strip(), "the text is empty"),
             (parts, f"{where} has nothing to say: only spaces and . , ; : ! ? (or only '|' and spaces)")])
    return parts


def read_texts(args):
    """The texts to rank, in order: the parts of --text, or of each line of --text-file (read_parts)."""
    return [part for part, _ in read_parts(args)]


def output_paths(out, n):
    stem, ext = os.path.splitext(out)
    return [out] if n == 1 else [f"{stem}-{i + 1}{ext or '.npy'}" for i in range(n)]


@torch.inference_mode()
def explain_prompt(say, model, text, ids, mels, o, group):
    """--explain, before decoding: each stage up to the first step, with the real tensors' shapes. group: the
    ids of every text decoded with this one (itself included)."""
    c = model.config.decoder
    latents = model.conditioning_latent(mels)
    prompt = model.decoder.prompt(latents.mean(dim=0)[None], ids[None])
    batch = o.rows(len(group))
    say(f"[text]     {text!r}\n           cleaned: {clean_text(text)!r}\n"
        f"           BPE ids [{len(ids)}]: {ids.tolist()[:16]}{' ...' if len(ids) > 16 else ''}")
    say(f"[audio]    {len(mels)} clip(s), each resampled to {SAMPLE_RATE} Hz mono, padded or cut to "
        f"{CONDITIONING_SAMPLES} samples ({CONDITIONING_SAMPLES / SAMPLE_RATE:g} s)\n"
        f"           log-mel spectrograms / mel_norms: mels {list(mels.shape)}")
    say(f"[latent]   conditioning encoder: mels {list(mels.shape)} -> 1x1 conv [C, {c.dim}, frames] -> "
        f"{c.conditioning_blocks} attention blocks -> first frame {list(latents.shape)} -> mean [{c.dim}]")
    say(f"[prompt]   [voice latent] + text [{c.text_start_token}] + ids + [{c.text_stop_token}, "
        f"{c.text_stop_token}] (text positions 0..{len(ids) + 2}) + start token {c.start_token} "
        f"(speech position 0): {list(prompt.shape)}")
    explain_caches(say, model, o, group)
    say(f"[decode]   {o.num_candidates} candidate(s) per text in batches of {batch}: each step embeds [{batch}, 1] tokens "
        f"(at speech positions {speech_position(1)}, {speech_position(2)}, ...), runs [{batch}, 1, {c.dim}] through the cached "
        f"blocks -> logits [{batch}, {c.speech_vocab_size}] -> repetition penalty {o.repetition_penalty}, "
        + ("greedy" if o.temperature == 0 else f"temperature {o.temperature}, top-p {o.top_p}")
        + f" -> next tokens; at most {o.max_new_tokens} steps, stop token {c.stop_token} ends a candidate")


def explain_caches(say, model, o, group):
    """--explain: the prefill and the KV caches, as the chosen engine keeps them."""
    c, batch, hd = model.config.decoder, o.rows(len(group)), model.config.decoder.dim // model.config.decoder.heads
    P = model.decoder.prompt_length(max(map(len, group)))
    if o.engine == "lesson":
        dtype = str(model.logit_scale.dtype)[6:]
        say(f"[prefill]  {c.layers} GPT-2 blocks over the prompt once, into a one-row KV cache [layers, rows, heads, "
            f"positions, head_dim] = {[c.layers, 1, c.heads, P + o.max_new_tokens, hd]}, in {dtype}")
        say(f"[cache]    each batch starts from {batch} copies of that row, {[c.layers, batch, c.heads, P + o.max_new_tokens, hd]}; "
            "a step writes the next position and attends over the filled part")
        return
    dtype = cache_dtype(model.logit_scale.device, model.logit_scale.dtype, o.cache_dtype)
    together = f", with {len(group) - 1} other text(s), left-padded to the longest" if len(group) > 1 else ""
    say(f"[prefill]  {c.layers} GPT-2 blocks over the prompt once{together}; its keys and values, each "
        f"[layers, heads, texts, positions, head_dim] = {[c.layers, c.heads, len(group), P, hd]}, are kept once per text, "
        f"in {str(dtype)[6:]}")
    packed = ", with the decoder's weights packed once for oneDNN" if can_pack(model.decoder.head.weight) else ""
    blocks = -(-o.max_new_tokens // StepCache.BLOCK)
    say(f"[cache]    each row's own steps: keys and values [layers, blocks, rows * heads, {StepCache.BLOCK}, head_dim] = "
        f"{[c.layers, blocks, batch * c.heads, StepCache.BLOCK, hd]}; a step reads each text's prompt once for all "
        f"its rows{packed}")


def explain_result(say, model, ids, gen, o):
    """--explain, after decoding: the fix, the two encoders and the scores."""
    say(f"[fix]      candidates {list(gen.candidates.shape)}: "
        + (f"stop-padded to {o.max_new_tokens}, " if o.pad_to_max else "")
        + f"from the first stop token on -> {FIX_STOP_CODE}, last three -> {', '.join(map(str, FIX_TAIL))}")
    say(f"[encoders] text ids + [{model.config.decoder.text_stop_token}] [1, {len(ids) + 1}] -> text encoder -> "
        f"[1, {model.config.text.projection_dim}]; candidates {list(gen.candidates.shape)} -> speech encoder -> "
        f"[{len(gen.candidates)}, {model.config.speech.projection_dim}]")
    say(f"[scores]   cosine similarity * exp(logit_scale) = {model.logit_scale.exp().item():.2f}: scores "
        f"{list(gen.scores.shape)}, best first -> keep the top {len(gen.best)}")


def texts_together(options):
    """How many parts decode together: as many as fill one batch with their candidates (the
    engine's); the lesson decodes one text at a time."""
    return 1 if options.engine == "lesson" else max(1, options.batch_size // options.num_candidates)


def prepare_run(args, device, options):
    """Everything checked, cheapest first, before the first decoding step: the outputs (none of them an
    input), the input files, the model, every part of the text, the memory the generation will need, the
    audio. -> (model, texts (the parts), the line each is from, ids for each, mels, output paths)."""
    parts = read_parts(args)
    texts, lines = [part for part, _ in parts], [n for _, n in parts]
    outs = output_paths(args.out, len(texts))
    inputs = [*args.audio, args.text_file or "", "" if args.random_init else args.checkpoint or default_checkpoint()]
    with prefixed("--out "):
        check_outputs(outs, [i for i in inputs if i])
    for path in args.audio:
        check_input_file(path, AudioError)
    model = prepare_model(args, device)
    check_options(options, model.config, flag)
    ids_list = []
    for text, n in parts:                                    # a refusal names the part, and its line in a file
        with prefixed(f"{args.text_file}, line {n}: " if args.text_file else ""):
            ids_list.append(encode_text(model, text))
    check_memory(model, max(len(ids) for ids in ids_list), options, min(texts_together(options), len(texts)))
    return model, texts, lines, ids_list, voice_mels(model, args.audio), outs


def run(args, device, options):
    """Rank each part's candidates and write its best tokens. Parts decode together, as many as fill one
    batch of --batch-size rows, and each group's outputs are written as soon as it is done: a failure on
    a later part leaves the earlier outputs complete, and the message says which they are."""
    model, texts, line_of, ids_list, mels, outs = prepare_run(args, device, options)
    quiet = args.quiet or args.json or not sys.stderr.isatty()
    say = print if args.explain and not args.json else None
    if args.random_init and not args.json:
        print("NOTE: --random-init: the weights are random, so the candidates and scores are meaningless; "
              "this run only shows every stage working.")
    results, group = [], texts_together(options)
    for first in range(0, len(texts), group):
        members = range(first, min(first + group, len(texts)))
        for i in members if say else ():
            explain_prompt(say, model, texts[i], ids_list[i], mels, options, [ids_list[j] for j in members])
        progress = Progress(not quiet)
        t0 = time.perf_counter()
        generations = speech_tokens(model, [texts[i] for i in members], args.audio, options, progress)
        progress.show("")
        seconds = time.perf_counter() - t0
        for i, gen in zip(members, generations):
            if say:
                explain_result(say, model, ids_list[i], gen, options)
            try:
                write_atomically(outs[i], lambda f: np.save(f, gen.best.cpu().numpy()))
            except OSError as e:
                done = f"; written before it: {', '.join(r['out'] for r in results)}" if results else ""
                raise UsageError(f"{outs[i]}: cannot write it ({e.strerror or first_line(e)}){done}") from None
            results.append(dict(text=texts[i], line=line_of[i], ids=ids_list[i].tolist(), out=outs[i],
                                seconds=round(seconds, 3), scores=[round(s, 6) for s in gen.scores.float().tolist()],
                                order=gen.order.tolist(), lengths=gen.lengths.tolist(), best=gen.best.tolist(),
                                decoded_with=len(members)))
            if not args.json:
                print_table(texts[i], gen, outs[i], seconds, len(members))
    if args.json:
        print(json.dumps(dict(checkpoint=None if args.random_init else (args.checkpoint or default_checkpoint()),
                              random_init=args.random_init, device=str(device), dtype=args.dtype,
                              scores_meaningful=not args.random_init, results=results), allow_nan=False))
    return 0


def print_table(text, gen, out, seconds, together=1, rows=10):
    with_others = f" (decoded with {together - 1} other part(s))" if together > 1 else ""
    print(f"\n{text!r}: {len(gen.scores)} candidates in {seconds:.1f} s{with_others}")
    print(f"{'rank':>4}  {'candidate':>9}  {'score':>9}  {'length':>6}")
    for place, i in enumerate(gen.order.tolist()[:rows]):
        print(f"{place + 1:>4}  {i:>9}  {gen.scores[i].item():>9.4f}  {gen.lengths[i].item():>6}")
    if len(gen.order) > rows:
        print(f"      ... {len(gen.order) - rows} more")
    print(f"best {len(gen.best)} candidate(s), tokens {list(gen.best.shape)}, written to {out}")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, as Ctrl-C raises KeyboardInterrupt: a file being
    written is removed on the way out (write_atomically), and the run ends in one line."""
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stopped_by_signals():
    """Inside the block SIGTERM and SIGHUP raise Stopped (in the main thread, where Python runs handlers);
    the earlier handlers come back after it."""
    names = [signal.SIGTERM, signal.SIGHUP] if threading.current_thread() is threading.main_thread() else []
    before = {n: signal.signal(n, stop) for n in names}
    try:
        yield
    finally:
        for n, handler in before.items():
            signal.signal(n, handler)


def run_command(prog, work):
    """How every command of this project ends: work() -> its exit code. An InputError (the user's mistake) or
    an OSError (a full disk, a file gone) is one line on stderr and exit code 2; anything else is a bug in
    this program: one line naming it, exit code 1, and CLVP_TRACEBACK=1 shows where. Warnings are shown only
    after a run that succeeds, so an error stays one line. Ctrl-C, SIGTERM and SIGHUP end it the same way,
    one line and no half-written file, with exit code 128 + the signal's number (130, 143, 129)."""
    for stream in (sys.stdout, sys.stderr):                 # a name that is not UTF-8, an ASCII terminal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    with warnings.catch_warnings(record=True) as caught, stopped_by_signals():
        warnings.simplefilter("default")
        try:
            code = work()
        except InputError as e:
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            print(f"{prog}: error: {where}{e.strerror or first_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            print(f"\n{prog}: {'interrupted' if signum == signal.SIGINT else f'stopped by {e}'}; nothing "
                  "half-written is left", file=sys.stderr)
            return 128 + signum
        except Exception as e:
            if os.environ.get("CLVP_TRACEBACK"):
                raise
            print(f"{prog}: internal error (a bug, please report it): {type(e).__name__}: {first_line(e)}; "
                  "rerun with CLVP_TRACEBACK=1 to see where", file=sys.stderr)
            return 1
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"{prog}: warning: {message}", file=sys.stderr)
    return code


def main(argv=None):
    def work():
        args = build_parser().parse_args(argv)
        return run(args, *check_args(args))
    return run_command("clvp.py", work)


# ===================================================================================================
# Appendix to Part I: the text normalization that is not CLVP, after Part IV, out of the lesson's way
#
# clean_text's transliteration to ASCII (unidecode's work in Tortoise) and its number spelling (inflect's),
# written out so that clvp.py needs neither library. The lesson calls them in one line; a reader can skip
# them. Last, the splitter that cuts a long text into parts of a few sentences, as Tortoise's read.py does;
# the command line (Part IV) ranks each part on its own.
# ===================================================================================================

# unidecode romanizes every character from tables. For accented Latin letters and compatibility
# forms ('ﬁ', '²', fullwidth 'Ａ') NFKD plus dropping the non-ASCII rest gives the same; this
# table holds the Latin-1, Latin Extended-A and General Punctuation characters where it does not.
# What is still not ASCII is dropped, as unidecode drops what it has no entry for (emoji).
# Deviation: unidecode also romanizes other scripts ('Москва' -> 'Moskva', '中文' -> 'Zhong Wen ')
# and Latin Extended-B ('ƒ' -> 'f'); those characters are dropped here.
_ASCII = str.maketrans({
    'Æ': 'AE', 'æ': 'ae', 'Ð': 'D', 'ð': 'd', 'Ø': 'O', 'ø': 'o', 'Þ': 'Th', 'þ': 'th', 'ß': 'ss',
    'ẞ': 'SS', 'Đ': 'D', 'đ': 'd', 'Ħ': 'H', 'ħ': 'h', 'ı': 'i', 'ĸ': 'k', 'Ŀ': 'L', 'ŀ': 'l',
    'Ł': 'L', 'ł': 'l', 'ŉ': "'n", 'Ŋ': 'NG', 'ŋ': 'ng', 'Œ': 'OE', 'œ': 'oe', 'Ŧ': 'T', 'ŧ': 't',
    'µ': 'u', '¡': '!', '¢': 'C/', '£': 'PS', '¤': '$?', '¥': 'Y=', '¦': '|', '§': 'SS', '¨': '"',
    '©': '(c)', '«': '<<', '¬': '!', '®': '(r)', '¯': '-', '°': 'deg', '±': '+-', '´': "'", '¶': 'P',
    '·': '*', '¸': ',', '»': '>>', '¼': ' 1/4', '½': ' 1/2', '¾': ' 3/4', '¿': '?', '×': 'x',
    '÷': '/', '€': 'EUR', '™': '(tm)', '\u200b': ' ', '\u2028': '\n', '\u2029': '\n\n',
    '‐': '-', '‑': '-', '‒': '-', '–': '-', '—': '--', '―': '--', '⁃': '--', '‾': '-', '⁀': '-',
    '‘': "'", '’': "'", '‛': "'", '′': "'", '″': "''", '‴': "'''", '⁗': "''''", '‚': ',',
    '„': ',,', '“': '"', '”': '"', '‟': '"', '‵': '`', '‶': '``', '‷': '```', '‹': '<', '›': '>',
    '‖': '||', '‗': '_', '‿': '_', '†': '+', '‡': '++', '•': '*', '‣': '*>', '※': '*', '⁎': '*',
    '⁂': '***', '‧': '.', '‰': '%0', '‱': '%00', '‸': '^', '⁁': '^', '‽': '!?', '⁄': '/',
    '⁅': '-[', '⁆': ']-', '⁊': '&', '⁋': 'PP', '⁌': '(]', '⁍': '[)', '⁒': '%', '⁓': '~',
})


def to_ascii(text):
    """'Ærø café – “ok”' -> 'AEro cafe - "ok"' (unidecode's answer for Latin text)."""
    text = unicodedata.normalize('NFKD', text.translate(_ASCII))
    return text.encode('ascii', 'ignore').decode('ascii')


# Numbers are spelled as inflect's number_to_words spells them: groups of three joined by
# commas, no 'and' after 'hundred' (Tortoise passes andword=''), e.g. 1234567 -> 'one million,
# two hundred thirty-four thousand, five hundred sixty-seven'.
_ONES = ('zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen '
         'fifteen sixteen seventeen eighteen nineteen').split()
_TENS = ['', ''] + 'twenty thirty forty fifty sixty seventy eighty ninety'.split()
_SCALES = ('', ' thousand', ' million', ' billion', ' trillion', ' quadrillion', ' quintillion',
           ' sextillion', ' septillion', ' octillion', ' nonillion', ' decillion')


def _below_100(n):
    return _ONES[n] if n < 20 else _TENS[n // 10] + ('-' + _ONES[n % 10] if n % 10 else '')


def _below_1000(n, andword):
    if n < 100:
        return _below_100(n)
    return _ONES[n // 100] + ' hundred' + (andword + _below_100(n % 100) if n % 100 else '')


def number_to_words(n, andword=' '):
    """inflect's number_to_words(n, andword='') for n >= 0; andword=' and ' gives inflect's default."""
    groups = []                                   # groups of three digits, lowest first
    while n:
        n, group = divmod(n, 1000)
        groups.append(group)
    if len(groups) > len(_SCALES):                # inflect raises NumOutOfRangeError here too
        raise ValueError('cannot spell a number of more than 36 digits')
    words = [_below_1000(g, andword) + _SCALES[i] for i, g in reversed(list(enumerate(groups))) if g]
    # inflect's quirk: a last group below one hundred is joined by the andword, not by a comma:
    # 1000020 -> 'one million twenty', but 1000100 -> 'one million, one hundred'.
    if len(words) > 1 and 0 < groups[0] < 100:
        return ', '.join(words[:-1]) + andword + words[-1]
    return ', '.join(words) or 'zero'


def _integer(digits):
    """int(digits) for what number_to_words can spell, refused before a long string is converted."""
    if len(digits.lstrip('0')) > 3 * len(_SCALES):
        raise ValueError(f'cannot spell a number of more than {3 * len(_SCALES)} digits')
    return int(digits)


_ORDINAL_ENDINGS = {'ty': 'tieth', 'one': 'first', 'two': 'second', 'three': 'third', 'five': 'fifth',
                    'eight': 'eighth', 'nine': 'ninth', 'twelve': 'twelfth'}


def _ordinal(m):
    """'21st' -> 'twenty-first'. Tortoise calls inflect on the whole match, which ignores the suffix
    ('21th' -> 'twenty-first') and keeps inflect's default 'and': '101st' -> 'one hundred and first'."""
    words = number_to_words(_integer(m.group(1)), andword=' and ')
    for ending, ordinal in _ORDINAL_ENDINGS.items():
        if words.endswith(ending):
            return words[:-len(ending)] + ordinal
    return words + 'th'


def _number(m):
    """Integers; 1001..2999 are read as years: 1999 -> 'nineteen ninety-nine', 1905 -> 'nineteen oh
    five', 1900 -> 'nineteen hundred', but 2000..2009 -> 'two thousand (five)'."""
    n = _integer(m.group(0))
    if not 1000 < n < 3000 or 2000 <= n < 2010:
        return number_to_words(n)
    high, low = divmod(n, 100)
    if low == 0:
        return _below_100(high) + ' hundred'
    return _below_100(high) + (' oh ' if low < 10 else ' ') + _below_100(low)


def _dollars(m):
    """'$12.50' -> '12 dollars, 50 cents' (spelled by the later rules); '$.5' -> '5 cents', and as in
    Tortoise '$12.5' -> '12 dollars, 5 cents'."""
    dollars, _, cents = m.group(1).partition('.')
    if '.' in cents:                              # '$1.2.3': left to the decimal rule
        return m.group(1) + ' dollars'
    amounts = [(_integer(dollars or '0'), 'dollar'), (_integer(cents or '0'), 'cent')]
    return ', '.join(f'{n} {unit}' + 's' * (n != 1) for n, unit in amounts if n) or 'zero dollars'


# Tortoise's rules in its order. Commas go first, so '1,2,3' is 123. Dollars come before the decimal
# rule, which then reads the digits after the point as a number: 3.14 -> 'three point fourteen'.
# Ordinals match inside words too: '1stop' -> 'firstop'. Tortoise also has a '£' rule, but unidecode
# has already made '£' into 'PS' by then, so it never fires ('£3' -> 'psthree'); it is left out here.
# Each rule that starts with [0-9]+ starts only where a run of digits starts ((?<![0-9])): it would fail
# from every later digit too, and trying them all makes a long run of digits quadratic.
_NUMBER_RULES = [
    (re.compile(r'[0-9][0-9,]+[0-9]'), lambda m: m.group(0).replace(',', '')),
    (re.compile(r'\$([0-9.,]*[0-9]+)'), _dollars),
    (re.compile(r'(?<![0-9])([0-9]+)\.([0-9]+)'), r'\1 point \2'),
    (re.compile(r'(?<![0-9])([0-9]+)(st|nd|rd|th)'), _ordinal),
    (re.compile(r'[0-9]+'), _number),
]


def spell_numbers(text):
    """'$5 in 1999' -> 'five dollars in nineteen ninety-nine': Tortoise's number rules, in its order."""
    for pattern, replacement in _NUMBER_RULES:
        text = pattern.sub(replacement, text)
    return text


# ---------------------------------------------------------------------------------------------------
# Long texts. The decoder reads at most 401 text tokens, a few sentences, so Tortoise's read.py and
# read_fast.py cut a longer text into parts of about 200 characters and speak each on its own. split_text
# reproduces tortoise/utils/text.py: split_and_recombine_text, the same parts for the same arguments
# (test_tortoise.py compares the two on Tortoise's texts and on thousands of random ones), quirks included:
#   - All whitespace, newlines too, becomes single spaces before anything else, so the original's rules for
#     newlines never fire: a newline is not a sentence end. Curly double quotes become '"'.
#   - Its look-ahead never sees the last character: it reads '' there, and `'' in s` is True for every
#     string s. So near the end a '.' ends a sentence whatever follows it, and a run of '!?.' takes in the
#     last character whatever it is: with desired_length=1, 'Hi!xy' -> 'Hi!', 'xy' but 'Hi!x' stays whole.
#   - A sentence end inside quotes does not count. A closing quote before a space is a place to cut when a
#     part grows too long, but never cuts by itself.
#   - Inside quotes or not is a flag, flipped at each '"' the walk steps on, forward and back; stepping back
#     flips it at the character it lands on, not at the one it leaves, so after a cut that steps back the
#     flag can disagree with the quotes before it.
#   - A part of only spaces and . , ; : ! ? is dropped; a part of only quotes is kept.
# The walk steps back at most max_length characters at each forced cut: a megabyte with no space, all quotes
# or all punctuation splits in about a second (measured).
# ---------------------------------------------------------------------------------------------------

_NOTHING_TO_SAY = set(' .,;:!?')


def _flips(text, a, b):
    """Whether the quote flag flips on a walk over text[a:b]: an odd number of '"' there."""
    return text.count('"', a, b) % 2 == 1


def _forced_cut(text, start, pos, ends, desired_length):
    """Where a part text[start:pos + 1] that has grown to max_length ends: at its last place to cut if it has
    one and is over half desired_length; else at the last space or ! ? . that leaves it longer than
    desired_length; else mid-word, at desired_length characters."""
    if ends and pos - start + 1 > desired_length / 2:
        return ends[-1]
    cut = pos
    while text[cut] not in '!?. ' and cut - start + 1 > desired_length:
        cut -= 1
    return cut


def split_text(text, desired_length=200, max_length=300):
    """A long text -> parts, each ending at the first sentence end outside quotes that makes it desired_length
    characters long, unless it reaches max_length first: then it is cut back (_forced_cut). Tortoise's
    split_and_recombine_text, quirks included (see above)."""
    require([(isinstance(text, str), f"split_text takes a string, not {describe(text)}"),
             (all(isinstance(n, int) and n >= 1 for n in (desired_length, max_length)),
              f"desired_length and max_length must be integers >= 1, not {desired_length!r}, {max_length!r}")])
    text = re.sub(r'\s+', ' ', text).replace('\u201c', '"').replace('\u201d', '"')
    last = len(text) - 1

    def sees(i, chars):          # the original's look-ahead: text[i] in chars, True at the last character
        return i >= last or text[i] in chars

    parts, ends = [], []         # ends: where the part being read may be cut (sentence ends, closing quotes)
    start, pos, quoted = 0, -1, False     # the part is text[start:pos + 1]
    while pos < last:
        pos += 1
        quoted ^= text[pos] == '"'
        if pos - start + 1 >= max_length:
            cut = _forced_cut(text, start, pos, ends, desired_length)
            quoted ^= _flips(text, cut, pos)                  # stepping back from pos to cut
            parts.append(text[start:cut + 1])
            start, pos, ends = cut + 1, cut, []
        elif not quoted and (text[pos] in '!?' or text[pos] == '.' and sees(pos + 1, ' ')):
            while pos < last and pos - start + 1 < max_length and sees(pos + 1, '!?.'):    # '?!?', '...'
                pos += 1
                quoted ^= text[pos] == '"'
            ends.append(pos)
            if pos - start + 1 >= desired_length:
                parts.append(text[start:pos + 1])
                start, ends = pos + 1, []
        elif quoted and pos + 1 < last and text[pos + 1] == '"' and sees(pos + 2, ' '):   # 'Go," said'
            quoted ^= _flips(text, pos + 1, pos + 3)
            pos += 2
            ends.append(pos)
    parts.append(text[start:])
    return [part.strip() for part in parts if not set(part) <= _NOTHING_TO_SAY]


def text_parts(text):
    """A text -> the parts to speak one by one, as read.py cuts it: at each '|' if it has one (the user's own
    cut; read.py keeps its parts as they are, here each is stripped and the empty ones dropped), else with
    split_text."""
    if '|' in text:
        return [part.strip() for part in text.split('|') if part.strip()]
    return split_text(text)


if __name__ == "__main__":
    sys.exit(main())
