"""clvp.py: CLVP, the text/voice ranker inside Tortoise TTS, in one file.

Tortoise turns text into speech in three stages. A GPT-2 style decoder, prompted with a voice and a
sentence, samples many candidate sequences of discrete "speech tokens". CLVP (Contrastive
Language-Voice Pretraining, CLIP for text and speech tokens) scores every candidate against the
sentence and keeps the best. A diffusion model and a vocoder then turn the winners into audio; those
last stages are outside this file.

    text --clean_text--> --Tokenizer--> ids ---------------------------.
    voice.wav --load_audio--> --log_mel_spectrogram--> mel             |
        mel --ConditioningEncoder--> voice latent                      v
        [voice latent, text embeddings, start] --Decoder (sample N)--> candidates [N, T]
        ids --Encoder(text)--> text features     candidates --Encoder(speech)--> speech features
        cosine similarity * exp(logit_scale) --> scores --> best candidates

The file reads top to bottom in that order: configuration, the model blocks (conditioning encoder,
decoder with its KV cache, the two CLVP encoders), the CLVP model, and loading. Shapes are noted as
[batch, ..., dim]. Numbers match the original Tortoise code and the Hugging Face port on the same
weights (see test_clvp.py); where they differ, the comments say which one this file follows.
"""
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# Configuration
#
# The official Tortoise sizes are the defaults. Token ids that the original hard-codes (text start 255,
# text stop 0, speech start 8192, speech stop 8193) live here too, so nothing below uses a bare number.
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
        return cls(DecoderConfig(**d["decoder"]), EncoderConfig(**d["text"]), EncoderConfig(**d["speech"]))


def tiny_config():
    """A small model with the official structure, for tests and for watching the pipeline run."""
    small = dict(dim=64, layers=2, heads=2, ff_dim=128, rotary_dim=32, projection_dim=64)
    return Config(DecoderConfig(dim=64, layers=2, heads=4, conditioning_blocks=2),
                  EncoderConfig(**small), EncoderConfig(vocab_size=8192, **small))


# ---------------------------------------------------------------------------------------------------
# Attention, shared by every block below
#
# All three networks use plain multi-head attention; they differ only in what goes around it (GroupNorm,
# rotary, a causal mask, a KV cache). One fused Linear makes q, k and v; these two helpers split and
# merge heads, and torch's scaled_dot_product_attention does the rest.
# ---------------------------------------------------------------------------------------------------


def split_heads(qkv, heads):
    """[B, T, 3 * D] -> three tensors of [B, heads, T, D / heads]."""
    B, T, _ = qkv.shape
    return qkv.view(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x):
    """[B, heads, T, head_dim] -> [B, T, heads * head_dim]."""
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)


# ---------------------------------------------------------------------------------------------------
# Conditioning encoder: a reference clip's mel spectrogram -> one voice latent
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
        return x + self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


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
# Decoder: GPT-2 over [voice latent, text, speech tokens], with a pre-allocated KV cache
#
# Tortoise's "UnifiedVoice" is a stock GPT-2 whose own token and position tables are unused. Instead it
# has two pairs of tables: text tokens + text positions, and speech tokens + speech positions. The
# prompt for generation is
#     [voice latent] + text_emb([255] + ids + [0, 0]) + text_pos(0, 1, ...) + [speech_emb(8192) + speech_pos(0)]
# (two stop tokens: one padded by api.py, one by inference_speech). After the blocks come two LayerNorms
# in a row (GPT-2's ln_f, then UnifiedVoice's final_norm) and the head over the 8194 speech tokens.
#
# The position quirk: at inference the original gives the k-th generated token speech position k + 1,
# so position 1 is never used (training used 0, 1, 2, ...). The original's GPT2InferenceModel counts
# the start token plus a fake prompt when it computes positions. Every published Tortoise sample was
# made that way, and the weights expect it, so generation here does the same (speech_position below).
# ---------------------------------------------------------------------------------------------------


def speech_position(k):
    """Speech position of the k-th generated token (k = 1, 2, ...); the start token sits at 0."""
    return k + 1


class KVCache:
    """Keys and values of every layer, allocated once per generation: [layers, N, heads, max_len, head_dim].

    Each step writes its new keys/values in place and attends to a view of everything so far, so step t
    costs O(t) and allocates nothing. The prompt is the same for all N candidates: it is run once at
    batch 1 and its keys/values are copied into every candidate's row.
    """

    def __init__(self, c: DecoderConfig, batch, max_len, device, dtype):
        shape = (c.layers, batch, c.heads, max_len, c.dim // c.heads)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    def update(self, layer, start, k, v):
        """Store k, v [B, heads, T, hd] at positions start.. of rows 0..B-1; return those rows so far."""
        B, end = k.shape[0], start + k.shape[2]
        self.k[layer, :B, :, start:end] = k
        self.v[layer, :B, :, start:end] = v
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]

    def broadcast_prompt(self, length):
        """Copy row 0's first `length` positions (the prompt, run once at batch 1) into every row."""
        self.k[:, 1:, :, :length] = self.k[:, :1, :, :length]
        self.v[:, 1:, :, :length] = self.v[:, :1, :, :length]


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

    def forward(self, x, layer=None, cache=None, start=0):  # x: [B, T, D]
        q, k, v = split_heads(self.qkv(self.norm1(x)), self.heads)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        # Several new positions at once only happen from position 0 (the prompt, or teacher forcing),
        # where a plain causal mask is right; a single new token may see everything before it.
        a = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
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

    def prompt(self, latent, text_ids):
        """latent [B, D], raw text ids [B, T] -> the prompt embeddings [B, 1 + (T + 3) + 1, D]."""
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

    def logits(self, h):                                     # [B, T, D] -> [B, T, 8194]
        return self.head(self.final_norm(self.norm(h)))


# ---------------------------------------------------------------------------------------------------
# CLVP encoders: token ids -> one feature vector
#
# The text and the speech encoder are the same network with different vocabularies: an x-transformers
# Encoder with pre-RMSNorm, rotary position embeddings and a GLU feed-forward, then a LayerNorm, the mean
# over all positions (no padding mask: padding changes the score, which is why generation pads the way
# Tortoise did) and a projection into the shared 768-wide space.
#
# Quirk: the x-transformers version Tortoise used rotates v as well as q and k, over the first 32 dims
# of each head only. RMSNorm follows the Hugging Face port (x * rsqrt(mean(x^2) + 1e-5)); x-transformers
# divides by max(rms, 1e-8) instead, a difference far below the test tolerance for real activations.
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
        x = x + self.out(merge_heads(F.scaled_dot_product_attention(q, k, v)))
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
# The CLVP model: the four networks and what a user asks of them
# ---------------------------------------------------------------------------------------------------


class CLVP(nn.Module):
    def __init__(self, config: Config = None):
        super().__init__()
        self.config = config = config or Config()
        self.conditioning = ConditioningEncoder(config.decoder)
        self.decoder = Decoder(config.decoder)
        self.text_encoder = Encoder(config.text)
        self.speech_encoder = Encoder(config.speech)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # learned, used as exp()
        self.tokenizer = None
        self.mel_norms = None

    def conditioning_latent(self, mels):
        """mels [C, 80, frames], one reference clip per row -> latents [C, D]."""
        return self.conditioning(mels)

    def voice_latent(self, mels):
        """Several clips of one voice -> one latent [D]: Tortoise averages the per-clip latents.
        mels: [C, 80, frames], or [B, C, 80, frames] for one voice per batch row -> [B, D]."""
        if mels.dim() == 3:
            return self.conditioning(mels).mean(dim=0)
        B, C = mels.shape[:2]
        return self.conditioning(mels.flatten(0, 1)).view(B, C, -1).mean(dim=1)

    def speech_logits(self, mels, text_ids, speech_ids):
        """Teacher-forced next-token logits, using the inference positions.

        mels: one voice ([C, 80, frames]) or one per row ([B, C, 80, frames]); text_ids: raw tokenizer
        ids [B, T] or [1, T]; speech_ids: [B, S] tokens after the start token.
        Returns [B, S + 1, 8194]: row s predicts token s + 1 (row 0 is what the prompt predicts).
        """
        B, S = speech_ids.shape
        latent = self.voice_latent(mels).expand(B, -1) if mels.dim() == 3 else self.voice_latent(mels)
        prompt = self.decoder.prompt(latent, text_ids.expand(B, -1))
        positions = speech_position(torch.arange(1, S + 1, device=speech_ids.device))
        speech = self.decoder.speech_embedding(speech_ids) + self.decoder.speech_positions(positions)
        h = self.decoder(torch.cat([prompt, speech], dim=1))
        return self.decoder.logits(h[:, prompt.shape[1] - 1:])

    def text_features(self, text_ids):
        """Raw text ids [B, T] -> [B, 768], projected, not normalized. Like Tortoise's reranking, the
        encoder sees the ids followed by one stop token."""
        return self.text_encoder(F.pad(text_ids, (0, 1), value=self.config.decoder.text_stop_token))

    def speech_features(self, speech_ids):
        """Speech tokens [B, S] (already fixed, see fix_candidates) -> [B, 768], not normalized."""
        return self.speech_encoder(speech_ids)

    def similarity(self, text_ids, speech_ids):
        """Scaled cosine similarity [B_text, B_speech]: the CLVP score."""
        t = F.normalize(self.text_features(text_ids), dim=-1)
        s = F.normalize(self.speech_features(speech_ids), dim=-1)
        return self.logit_scale.exp() * t @ s.T

    def generate(self, text_ids, mels, **options):
        """Sample candidates and rank them: see generate_and_rank in the generation section."""
        return generate_and_rank(self, text_ids, mels, **options)

    def contrastive_loss(self, text_ids, speech_ids):
        """CLIP's symmetric cross-entropy over a batch of matching (text, speech) rows."""
        sim = self.similarity(text_ids, speech_ids)
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


# ---------------------------------------------------------------------------------------------------
# Generation and reranking: sample N candidates, score them with CLVP, keep the best
#
# 1. Prefill: the prompt (voice latent, text, start token) is the same for every candidate, so it runs
#    once at batch 1; its keys/values are copied into every row of the KV cache.
# 2. Decode: all candidates of a batch advance one token per step through the cache. Each step's
#    logits go through the same processors, in the same order, as transformers' generate: repetition
#    penalty, temperature, top-p, typical. A candidate that emits the stop token keeps emitting it;
#    the loop ends early when every candidate has stopped.
# 3. Fix and rerank: each candidate is cleaned up as Tortoise's fix_autoregressive_output does, then
#    scored by CLVP against the text.
#
# The repetition penalty covers the start token and the tokens generated so far, as in the Hugging
# Face port. The original Tortoise prompt also held a run of fake token-1 entries, so it penalized
# speech token 1 as well; see the README.
# ---------------------------------------------------------------------------------------------------

FIX_STOP_CODE, FIX_TAIL = 83, (45, 45, 248)    # Tortoise's codes for "silence" and a clean ending


@dataclass
class Generation:
    candidates: torch.Tensor   # [N, T] fixed speech tokens, exactly as CLVP scored them
    lengths: torch.Tensor      # [N] tokens before each candidate's stop token
    scores: torch.Tensor       # [N] CLVP score of each candidate against the text
    order: torch.Tensor        # [N] candidate indices, best first
    best: torch.Tensor         # [top_k, T] the top candidates, best first


def repetition_penalty(logits, seen, penalty):
    """Make every token already seen less likely: positive logits / penalty, negative * penalty."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


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


def next_tokens(logits, seen, temperature, top_p, penalty, typical_mass, generator):
    """[B, vocab] logits -> [B] tokens. temperature 0 means greedy (the penalty still applies)."""
    logits = repetition_penalty(logits.float(), seen, penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1:
        logits = top_p_filter(logits, top_p)
    if typical_mass is not None:
        logits = typical_filter(logits, typical_mass)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def decode_batch(decoder, cache, prompt_logits, prompt_len, max_new_tokens, sampling, on_step=None):
    """Advance B candidates from the shared prompt until all stop -> tokens [B, steps], stop-padded."""
    c = decoder.config
    B, device = prompt_logits.shape[0], prompt_logits.device
    tokens = torch.full((B, max_new_tokens), c.stop_token, dtype=torch.long, device=device)
    seen = torch.zeros(B, c.speech_vocab_size, dtype=torch.bool, device=device)
    seen[:, c.start_token] = True
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = prompt_logits
    for k in range(max_new_tokens):
        logits[:, c.start_token] = -math.inf                              # never start again
        token = next_tokens(logits, seen, **sampling).masked_fill(done, c.stop_token)
        tokens[:, k] = token
        seen[torch.arange(B, device=device), token] = True
        done |= token == c.stop_token
        if on_step:
            on_step(B, int((~done).sum()))
        if done.all():
            return tokens[:, :k + 1]
        x = decoder.embed_speech(token[:, None], speech_position(k + 1))  # [B, 1, D]
        logits = decoder.logits(decoder(x, cache, start=prompt_len + k))[:, -1]
    return tokens


def fix_candidates(tokens, stop_token, pad_to=None):
    """Tortoise's fix_autoregressive_output on [N, T]: from the first stop token on, codes become 83 and
    the last three 45, 45, 248; a candidate that never stopped is left alone. With pad_to, candidates are
    first stop-padded to that length, as Tortoise's api.py does (so every candidate gets the fix)."""
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


@torch.inference_mode()
def generate_and_rank(model, text_ids, mels, num_candidates=16, batch_size=16, max_new_tokens=500,
                      temperature=0.8, top_p=0.8, repetition_penalty=2.0, typical_mass=None, top_k=1,
                      seed=None, pad_to_max=True, on_step=None):
    """Sample num_candidates speech-token sequences for one text in one voice and rank them by CLVP.

    text_ids: raw tokenizer ids [T] or [1, T]; mels: [C, 80, frames], one row per reference clip.
    """
    dec, c = model.decoder, model.config.decoder
    device = mels.device
    text_ids = text_ids.reshape(1, -1)
    prompt = dec.prompt(model.voice_latent(mels)[None], text_ids)            # [1, P, D]
    P = prompt.shape[1]
    cache = KVCache(c, min(batch_size, num_candidates), P + max_new_tokens, device, prompt.dtype)
    prompt_logits = dec.logits(dec(prompt, cache)[:, -1:])[:, -1]          # [1, vocab], shared
    cache.broadcast_prompt(P)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    sampling = dict(temperature=temperature, top_p=top_p, penalty=repetition_penalty,
                    typical_mass=typical_mass, generator=generator)
    batches = []
    for first in range(0, num_candidates, batch_size):
        B = min(batch_size, num_candidates - first)
        batches.append(decode_batch(dec, cache, prompt_logits.expand(B, -1).clone(), P, max_new_tokens,
                                    sampling, on_step))
    longest = max(b.shape[1] for b in batches)
    tokens = torch.cat([F.pad(b, (0, longest - b.shape[1]), value=c.stop_token) for b in batches])
    candidates, lengths = fix_candidates(tokens, c.stop_token, max_new_tokens if pad_to_max else None)
    scores = torch.cat([model.similarity(text_ids, candidates[i:i + batch_size])[0]
                        for i in range(0, num_candidates, batch_size)])
    order = scores.argsort(descending=True)
    return Generation(candidates, lengths, scores, order, candidates[order[:top_k]])


# ---------------------------------------------------------------------------------------------------
# Loading: one file holds config, weights, tokenizer and mel norms
#
# convert_weights.py writes it from official checkpoints. It is read with torch.load(weights_only=True),
# which refuses anything but tensors and plain containers, so a checkpoint can never run code.
# ---------------------------------------------------------------------------------------------------

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def resolve_device(device=None):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_weights(expected, weights, source):
    """Raise one CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [f"{k} has shape {list(weights[k].shape)}, expected {list(v.shape)}"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{source}: {len(problems)} bad tensor(s): " + "; ".join(problems))


def save_checkpoint(path, config, weights, tokenizer=None, mel_norms=None, dtype=None):
    """Write a checkpoint atomically: to a temporary file beside `path`, renamed only when complete."""
    with torch.device("meta"):
        check_weights(CLVP(config).state_dict(), weights, "weights")
    weights = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in weights.items()}
    blob = {"format": "clvp", "version": FORMAT_VERSION, "config": asdict(config), "weights": weights,
            "tokenizer": None if tokenizer is None else {"vocab": tokenizer.vocab, "merges": tokenizer.merges},
            "mel_norms": None if mel_norms is None else torch.as_tensor(mel_norms, dtype=torch.float32)}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".clvp-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_model(path, device=None):
    """Read a converted checkpoint -> CLVP in eval mode, fp32, on `device` (CUDA when present)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable clvp checkpoint ({reason[:200]})") from None
    if not isinstance(blob, dict) or blob.get("format") != "clvp":
        raise CheckpointError(f"{path}: not a clvp checkpoint (convert official weights with convert_weights.py)")
    if blob.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {blob.get('version')}, this clvp.py reads {FORMAT_VERSION}")
    config = Config.from_dict(blob["config"])
    with torch.device("meta"):                               # no memory, no random init: weights come next
        model = CLVP(config)
    check_weights(model.state_dict(), blob["weights"], path)
    model.load_state_dict(blob["weights"], assign=True)
    if blob["tokenizer"] is not None:
        model.tokenizer = Tokenizer(blob["tokenizer"]["vocab"], blob["tokenizer"]["merges"])
    model.mel_norms = blob["mel_norms"]
    device = resolve_device(device)
    if model.mel_norms is not None:
        model.mel_norms = model.mel_norms.to(device)
    return model.to(device=device, dtype=torch.float32).eval()
