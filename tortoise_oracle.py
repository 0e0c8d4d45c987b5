"""oracle.py: run the ORIGINAL Tortoise code on random weights and record what it computes.

    <venv>/bin/python oracle.py --src tortoise-tts-3.0.0 --out DIR --size tiny|official --seed 0

Runs under a virtual environment with what tortoise-tts 3.0.0 needs for these two models
(transformers 4.31.0, einops, rotary-embedding-torch; see test_tortoise.py for the pinned list), never
under the project's own environment. It imports tortoise/models/autoregressive.py and
tortoise/models/clvp.py from the unpacked source package and writes into DIR:

  autoregressive.pth  UnifiedVoice's state dict in the layout of the official file: no inference_model.*
                      or gpt.wte copies (post_init_gpt2_config adds those after loading), plus the GPT-2
                      mask buffers gpt.h.N.attn.bias / masked_bias that the official file carries (it was
                      saved with an older transformers; api.py loads it with strict=False because of them)
  clvp2.pth           CLVP's state dict
  expected.pt         inputs and the original's outputs (a dict of tensors, readable with weights_only=True)

Every parameter gets N(0, 0.02) noise on top of its initialisation (zero-initialised proj_out
included), and mel_head's bias for the start token 8192 is set to -1e4 so greedy decoding never picks
it. Nothing here is compared; test_tortoise.py does that against clvp.py.
"""
import argparse
import importlib
import ast
import os
import sys
import time
import types
import warnings

import torch
import torch.nn.functional as F

# (UnifiedVoice kwargs, CLVP kwargs) on top of the ones api.py passes. tiny keeps the official structure
# (6 conditioning blocks, the official position tables and vocabularies); its widths keep 64-wide heads,
# as clvp's converter infers heads as width // 64. The two CLVP encoders differ in width and heads on
# purpose, so the converter has to read each one's sizes separately.
SIZES = {
    "official": (dict(layers=30, model_dim=1024, heads=16),
                 dict(dim_text=768, dim_speech=768, dim_latent=768, text_enc_depth=20, text_heads=12,
                      speech_enc_depth=20, speech_heads=12)),
    "tiny": (dict(layers=2, model_dim=128, heads=2),
             dict(dim_text=64, dim_speech=128, dim_latent=96, text_enc_depth=2, text_heads=1,
                  speech_enc_depth=2, speech_heads=2)),
}
AR_COMMON = dict(max_text_tokens=402, max_mel_tokens=604, max_conditioning_inputs=2, number_text_tokens=255,
                 start_text_token=255, train_solo_embeddings=False, checkpointing=False)
CLVP_COMMON = dict(num_text_tokens=256, text_seq_len=350, num_speech_tokens=8192, speech_seq_len=430,
                   use_xformers=True)

STEPS = 40            # greedy decode steps (max_generate_length)
TEXT_TOKENS = 20      # raw text ids (before api.py's stop pad)
CLIPS, FRAMES = 2, 517   # conditioning clips and mel frames per clip (6 s at 22050 Hz)


def import_tortoise(src):
    """The two model modules, from the unpacked sdist. arch_util imports torchaudio for its mel
    spectrogram, which these models never call: a stub stands in (after transformers is imported, whose
    package probe would choke on a stub)."""
    importlib.import_module("transformers")                 # first: see the docstring
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    sys.path.insert(0, os.path.abspath(src))
    from tortoise.models.autoregressive import UnifiedVoice
    from tortoise.models.clvp import CLVP
    return UnifiedVoice, CLVP


def api_function(src, name, file="api.py", **names):
    """One function (or TextToSpeech method) of tortoise/api.py (or api_fast.py), compiled on its own with
    `names` as its globals: the file itself imports the classifier, CVVP, wav2vec alignment, progressbar, ...
    none of which the function needs."""
    path = os.path.join(src, "tortoise", file)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    bodies = tree.body + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
    node = next(n for n in bodies if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    namespace = {"torch": torch, "F": F, **names}
    exec(compile(ast.Module([node], []), path, "exec"), namespace)
    return namespace[name]


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def legacy_gpt2_buffers(ar):
    """The per-layer mask buffers older transformers saved in the state dict (4.31 no longer does)."""
    n = ar.gpt.config.n_positions
    bias = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    out = {}
    for i in range(len(ar.gpt.h)):
        out[f"gpt.h.{i}.attn.bias"] = bias
        out[f"gpt.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def greedy(ar, cond, text_tokens, penalty):
    """UnifiedVoice.inference_speech exactly as api.py calls it, greedy; the wrapper around
    inference_model.generate only asks transformers for the per-step scores as well."""
    generate, captured = ar.inference_model.generate, {}

    def generate_with_scores(*args, **kwargs):
        out = generate(*args, output_scores=True, return_dict_in_generate=True, **kwargs)
        captured["scores"] = torch.stack(out.scores, dim=1)          # [1, steps, 8194]
        captured["prompt"] = args[0]
        return out.sequences

    ar.inference_model.generate = generate_with_scores
    try:
        codes = ar.inference_speech(cond, text_tokens, do_sample=False, num_return_sequences=1,
                                    repetition_penalty=penalty, max_generate_length=STEPS)
    finally:
        ar.inference_model.generate = generate
    return codes, captured["scores"], captured["prompt"]


def stop_halfway(ar, cond, text_tokens):
    """Raise mel_head's bias for the stop token so that greedy decoding stops after about STEPS / 2 tokens
    (random weights never pick it), with a clear margin both ways. Only the stop logit moves, so the tokens
    before the stop stay what they were."""
    _, scores, _ = greedy(ar, cond, text_tokens, 1.0)
    s = scores[0]
    gap = s.max(-1).values - s[:, ar.stop_mel_token]          # how far behind the winner the stop is, per step
    best = None
    for k in range(STEPS // 4, STEPS):                          # where gap sets a new low, by how much
        margin = (gap[:k].min() - gap[k]).item()
        if margin > 0 and (best is None or margin > best[1]):
            best = (k, margin)
    k, margin = best
    with torch.no_grad():
        ar.mel_head.bias[ar.stop_mel_token] += gap[k] + margin / 2
    return k


# ---------------------------------------------------------------------------------------------------
# --audio: the diffusion decoder, the sampler and UnivNet (official sizes), and the chain from codes to a WAV
# ---------------------------------------------------------------------------------------------------

AUDIO_T = (0, 1000, 3999)           # original timesteps of the network forwards compared
AUDIO_LATENTS = 48                  # AR latents of the piece tests -> L = 208 mel frames
CHAINS = {"unguided": (30, False, 0.0, 1.0), "guided": (24, True, 2.0, 0.8)}   # steps, cond_free, k, temperature
STOP_AT = 40                        # the chain's candidate stops here: 48 latents survive the calm trim


def import_audio(src):
    """The audio modules, with the real torchaudio (pure Python: its native libraries removed by
    test_tortoise.py) and librosa."""
    importlib.import_module("transformers")                 # first: see the docstring
    sys.path.insert(0, os.path.abspath(src))
    import torchaudio
    from tortoise.models.arch_util import TorchMelSpectrogram
    from tortoise.models.autoregressive import UnifiedVoice
    from tortoise.models.diffusion_decoder import DiffusionTts
    from tortoise.models.vocoder import UnivNetGenerator
    from tortoise.utils import audio, diffusion
    return torchaudio, TorchMelSpectrogram, UnifiedVoice, DiffusionTts, UnivNetGenerator, audio, diffusion


def sampler_steps(diffuser, name, L, g, out):
    """p_mean_variance and ddim_sample at three respaced steps, on a fake network whose outputs are fixed
    tensors (conditioned and conditioning-free), so only the step math is compared."""
    x = torch.randn(1, 100, L, generator=g)
    eps_c, eps_u = torch.randn(1, 100, L, generator=g), torch.randn(1, 100, L, generator=g)
    var = torch.rand(1, 100, L, generator=g) * 2 - 1
    seen = []

    def fake(x_, t_, conditioning_free=False, **kwargs):
        seen.append(int(t_[0]))
        return torch.cat([eps_u if conditioning_free else eps_c, var], dim=1)
    fake.parameters = lambda: iter([x])
    out[f"{name} x"], out[f"{name} eps"], out[f"{name} eps_free"], out[f"{name} var"] = x, eps_c, eps_u, var
    n = diffuser.num_timesteps
    for i in (n - 1, n // 2, 0):
        t = torch.tensor([i])
        r = diffuser.p_mean_variance(fake, x, t)
        for key in ("mean", "log_variance", "pred_xstart"):
            out[f"{name} {i} {key}"] = r[key]
        out[f"{name} {i} ddim"] = diffuser.ddim_sample(fake, x, t)["sample"]
    out[f"{name} timesteps"] = torch.tensor(seen)


def audio_main(args):
    torchaudio, TorchMelSpectrogram, UnifiedVoice, DiffusionTts, UnivNetGenerator, audio, diffusion = import_audio(args.src)
    names = dict(torchaudio=torchaudio, TorchMelSpectrogram=TorchMelSpectrogram, random=__import__("random"),
                 wav_to_univnet_mel=audio.wav_to_univnet_mel, denormalize_tacotron_mel=audio.denormalize_tacotron_mel,
                 SpacedDiffusion=diffusion.SpacedDiffusion, space_timesteps=diffusion.space_timesteps,
                 get_named_beta_schedule=diffusion.get_named_beta_schedule)
    for name in ("pad_or_truncate", "format_conditioning", "fix_autoregressive_output",
                 "load_discrete_vocoder_diffuser", "do_spectrogram_diffusion", "get_conditioning_latents"):
        names[name] = api_function(args.src, name, **names)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = DiffusionTts(model_channels=1024, num_layers=10, in_channels=100, out_channels=200,     # api.py:220
                         in_latent_channels=1024, in_tokens=8193, dropout=0, use_fp16=False, num_heads=16,
                         layer_drop=0, unconditioned_percentage=0).eval()
    randomize(model)
    torch.save(model.state_dict(), os.path.join(args.out, "diffusion_decoder.pth"))
    vocoder = UnivNetGenerator()
    randomize(vocoder)                         # weight_g too: g is no longer |v|, so folding is exercised
    torch.save({"model_g": vocoder.state_dict()}, os.path.join(args.out, "vocoder.pth"))
    vocoder.eval(inference=True)               # api.py:235: removes weight norm
    ar = UnifiedVoice(**SIZES["official"][0], **AR_COMMON).eval()
    ar.load_state_dict(torch.load(os.path.join(args.ar, "autoregressive.pth")), strict=False)
    t_build = time.perf_counter() - t0

    g = torch.Generator().manual_seed(args.seed + 1)
    out = {}
    with torch.no_grad():
        clips = [audio.load_audio(p, 22050) for p in args.voice]            # [1, samples] each
        out["resampled"] = torchaudio.functional.resample(clips[0][0], 22050, 24000)
        out["voice_mel"] = audio.wav_to_univnet_mel(names["pad_or_truncate"](out["resampled"][None], 102400),
                                                    do_normalization=False, device="cpu")
        tts = types.SimpleNamespace(device="cpu", autoregressive=ar, diffusion=model)
        auto_latent, voice = names["get_conditioning_latents"](tts, clips)
        out["auto_latent"], out["voice_latent"] = auto_latent, voice
        # The pieces: timestep_independent, the network at three timesteps, both ways.
        latents = torch.randn(1, AUDIO_LATENTS, 1024, generator=g)
        L = AUDIO_LATENTS * 4 * 24000 // 22050
        emb = model.timestep_independent(latents, voice, L, False)
        x = torch.randn(1, 100, L, generator=g)
        out.update(piece_latents=latents, conditioning=emb, x=x)
        for t in AUDIO_T:
            out[f"forward {t}"] = model(x, torch.tensor([t]), precomputed_aligned_embeddings=emb)
            out[f"forward {t} free"] = model(x, torch.tensor([t]), precomputed_aligned_embeddings=emb, conditioning_free=True)
        for name, (steps, free, k, _) in CHAINS.items():
            sampler_steps(names["load_discrete_vocoder_diffuser"](desired_diffusion_steps=steps, cond_free=free,
                                                                  cond_free_k=k), name, L, g, out)
        mel = audio.denormalize_tacotron_mel(torch.rand(1, 100, 40, generator=g) * 2 - 1)
        z = torch.randn(1, 64, 50, generator=g)
        out.update(vocoder_mel=mel, vocoder_z=z, vocoder_wav=vocoder.inference(mel, z))
        t_pieces = time.perf_counter() - t0 - t_build

        # The AR latents of two candidates (api.py:501-513): one stops at STOP_AT, one never does.
        text_ids = torch.tensor([[int(i) for i in args.text_ids.split(",")]])
        text_tokens = F.pad(text_ids, (0, 1))
        codes = torch.randint(0, 8192, (2, 500), generator=g)
        codes[0, STOP_AT:] = ar.stop_mel_token
        codes[0] = names["fix_autoregressive_output"](codes[0], ar.stop_mel_token, complain=False)
        best_latents = ar(auto_latent.repeat(2, 1), text_tokens.repeat(2, 1), torch.tensor([text_tokens.shape[-1]]),
                          codes, torch.tensor([codes.shape[-1] * ar.mel_length_compression]), return_latent=True,
                          clip_inputs=False)
        kept = []
        for b in range(2):          # api.py:536-545, the calm-token trim, as written there
            ctokens, keep = 0, codes.shape[-1]
            for k in range(codes.shape[-1]):
                ctokens = ctokens + 1 if codes[b, k] == 83 else 0
                if ctokens > 8:
                    keep = k
                    break
            kept.append(keep)
        out.update(text_ids=text_ids, codes=codes, ar_latents=best_latents, kept=torch.tensor(kept))
        # The chain: seed, do_spectrogram_diffusion, vocoder.inference (api.py:548-550).
        for name, (steps, free, k, temperature) in CHAINS.items():
            torch.manual_seed(args.seed)
            diffuser = names["load_discrete_vocoder_diffuser"](desired_diffusion_steps=steps, cond_free=free, cond_free_k=k)
            mel = names["do_spectrogram_diffusion"](model, diffuser, best_latents[:1, :kept[0]], voice,
                                                    temperature=temperature, verbose=False)
            out[f"{name} wav"] = vocoder.inference(mel)[0, 0]
    out["seed"] = args.seed
    torch.save(out, os.path.join(args.out, "expected_audio.pt"))
    print(f"oracle --audio: build {t_build:.1f} s, pieces {t_pieces:.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------------
# --fast: api_fast.py's HiFi-GAN path (official sizes): the decoder per call, tts() and tts_stream() for given codes
# ---------------------------------------------------------------------------------------------------

FAST_CALL_LATENTS = 37              # latents of the per-call comparison
FAST_TTS_CODES = 69                 # codes before the stop token in tts()'s comparison
FAST_STREAM_CODES = 130             # ... and in the stream's: decodes at 60 and 100 yields, then the end at 131


def import_hifigan(src):
    """models/hifigan_decoder.py with its one CUDA line patched: inference() moves its input to "cuda"."""
    path = os.path.join(src, "tortoise", "models", "hifigan_decoder.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.count('up_2.to("cuda")') == 1, "hifigan_decoder.py changed: the CUDA patch no longer applies"
    namespace = {"__name__": "hifigan_decoder"}
    exec(compile(text.replace('up_2.to("cuda")', "up_2"), path, "exec"), namespace)
    return namespace["HifiganGenerator"]


class ForceCodes:
    """A logits processor that leaves only the next of `codes` finite: the stream generator, sampling as
    tts_stream asks (top-k 50, top-p 0.8, ...), then yields exactly these codes with its own latents."""

    def __init__(self, codes, prompt_length):
        self.codes, self.prompt_length = codes, prompt_length

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.codes[input_ids.shape[1] - self.prompt_length]] = 0
        return forced


def fast_main(args):
    torchaudio, TorchMelSpectrogram, UnifiedVoice, _, _, audio, _ = import_audio(args.src)
    from tortoise.models.stream_generator import init_stream_support
    from transformers import LogitsProcessorList
    init_stream_support()
    HifiganGenerator = import_hifigan(args.src)
    names = dict(torchaudio=torchaudio, TorchMelSpectrogram=TorchMelSpectrogram, random=__import__("random"),
                 time=time.time)
    for name in ("format_conditioning", "get_conditioning_latents", "tts", "tts_stream", "handle_chunks",
                 "deterministic_state"):
        names[name] = api_function(args.src, name, "api_fast.py", **names)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    hifi = HifiganGenerator(in_channels=1024, out_channels=1, resblock_type="1",                 # api_fast.py:218
                            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], resblock_kernel_sizes=[3, 7, 11],
                            upsample_kernel_sizes=[16, 16, 4, 4], upsample_initial_channel=512,
                            upsample_factors=[8, 8, 2, 2], cond_channels=1024).eval()
    randomize(hifi)                                  # weight_g too: g is no longer |v|, so folding is exercised
    torch.save(hifi.state_dict(), os.path.join(args.out, "hifidecoder.pth"))
    ar = UnifiedVoice(**SIZES["official"][0], **AR_COMMON).eval()
    ar.load_state_dict(torch.load(os.path.join(args.ar, "autoregressive.pth")), strict=False)
    ar.post_init_gpt2_config(use_deepspeed=False, kv_cache=True)     # as api_fast.py does after loading
    t_build = time.perf_counter() - t0

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = [int(i) for i in args.text_ids.split(",")]
    out = {}
    with torch.no_grad():
        clips = [audio.load_audio(p, 22050) for p in args.voice]
        tts = types.SimpleNamespace(device="cpu", autoregressive=ar, hifi_decoder=hifi, half=False,
                                    tokenizer=types.SimpleNamespace(encode=lambda text: ids))
        for name in ("get_conditioning_latents", "handle_chunks", "deterministic_state"):
            setattr(tts, name, types.MethodType(names[name], tts))
        auto_latent = tts.get_conditioning_latents(clips)                          # [1, 1024]
        tts.get_random_conditioning_latents = lambda: auto_latent                   # voice_samples=None below
        latents = torch.randn(1, FAST_CALL_LATENTS, 1024, generator=g)
        out.update(auto_latent=auto_latent, call_latents=latents, call_wav=hifi.inference(latents, auto_latent))

        # tts(): inference_speech stands in with the codes it "sampled" (they end in the stop token).
        codes = torch.cat([torch.randint(0, 8192, (1, FAST_TTS_CODES), generator=g), torch.tensor([[8193]])], 1)
        ar.inference_speech = lambda *a, **k: codes
        out.update(tts_codes=codes, tts_wav=names["tts"](tts, "text", voice_samples=None, verbose=False,
                                                         use_deterministic_seed=args.seed))
        del ar.inference_speech

        # tts_stream(): its stream generator forced to these codes; the latents it yields are recorded.
        codes = torch.cat([torch.randint(0, 8192, (FAST_STREAM_CODES,), generator=g), torch.tensor([8193])])
        get_generator, seen = ar.get_generator, []

        def recording(fake_inputs, **kwargs):
            for token, latent in get_generator(fake_inputs, **kwargs):
                seen.append(latent)
                yield token, latent
        ar.get_generator = recording
        chunks = list(names["tts_stream"](tts, "text", voice_samples=None, verbose=False,
                                          logits_processor=LogitsProcessorList([ForceCodes(codes, len(ids) + 5)])))
        # what its handle_chunks holds back at the end and never plays: the last decode's last 1024 samples
        tail = hifi.inference(torch.cat(seen)[None], auto_latent)[0, 0, -1024:]
        out.update(stream_codes=codes[None], stream_latents=torch.cat(seen)[None], stream_tail=tail,
                   stream_chunks=torch.cat(chunks), stream_chunk_lengths=torch.tensor([len(c) for c in chunks]))
    out["seed"] = args.seed
    torch.save(out, os.path.join(args.out, "expected_fast.pt"))
    print(f"oracle --fast: build {t_build:.1f} s, total {time.perf_counter() - t0:.1f} s, "
          f"{len(chunks)} stream chunks")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="the unpacked tortoise-tts 3.0.0 source package")
    p.add_argument("--out", required=True, help="directory for autoregressive.pth, clvp2.pth, expected.pt")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audio", action="store_true", help="the audio stages instead (official size)")
    p.add_argument("--fast", action="store_true", help="api_fast.py's HiFi-GAN path instead (official size)")
    p.add_argument("--ar", help="--audio, --fast: the directory of an official-size run's autoregressive.pth")
    p.add_argument("--voice", nargs="+", help="--audio: reference clips (22.05 kHz WAV, at most 6 s)")
    p.add_argument("--text-ids", help="--audio: the chain's raw text ids, comma-separated")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.makedirs(args.out, exist_ok=True)
    if args.audio:
        return audio_main(args)
    if args.fast:
        return fast_main(args)
    t0 = time.perf_counter()
    UnifiedVoice, CLVP = import_tortoise(args.src)
    fix_autoregressive_output = api_function(args.src, "fix_autoregressive_output")
    ar_kwargs, clvp_kwargs = SIZES[args.size]

    torch.manual_seed(args.seed)
    ar = UnifiedVoice(**ar_kwargs, **AR_COMMON).eval()
    randomize(ar)
    with torch.no_grad():
        ar.mel_head.bias[ar.start_mel_token] = -1e4
    saved = list(ar.state_dict())                  # before post_init_gpt2_config adds its inference copies
    ar.post_init_gpt2_config(use_deepspeed=False, kv_cache=True)      # as api.py does after loading

    g = torch.Generator().manual_seed(args.seed + 1)
    mels = torch.randn(1, CLIPS, 80, FRAMES, generator=g)            # [batch, clips, 80, frames]
    text_ids = torch.randint(3, 200, (1, TEXT_TOKENS), generator=g)  # raw tokenizer ids
    text_tokens = F.pad(text_ids, (0, 1))                            # api.py: "This may not be necessary."
    with torch.no_grad():
        stop_at = stop_halfway(ar, ar.get_conditioning(mels), text_tokens)
    state = ar.state_dict()
    torch.save({**{k: state[k] for k in saved}, **legacy_gpt2_buffers(ar)},
               os.path.join(args.out, "autoregressive.pth"))

    clip = CLVP(**clvp_kwargs, **CLVP_COMMON).eval()
    randomize(clip)
    torch.save(clip.state_dict(), os.path.join(args.out, "clvp2.pth"))
    t_build = time.perf_counter() - t0

    n_rows, row_len = 4, 50
    speech_rows = torch.randint(0, 8192, (n_rows, row_len), generator=g)
    loss_texts = torch.randint(3, 200, (n_rows, TEXT_TOKENS), generator=g)
    # Rows for fix_autoregressive_output: a stop at 0, in the middle, in the last three, and none.
    fix_rows = torch.randint(0, 8192, (4, STEPS), generator=g)
    for row, at in zip(fix_rows, (0, STEPS // 2, STEPS - 2)):
        row[at:] = ar.stop_mel_token

    out = {"stop_at": stop_at}
    t1 = time.perf_counter()
    with torch.no_grad():
        cond = ar.get_conditioning(mels)                              # [1, D]
        for name, penalty in (("greedy", 1.0), ("penalized", 2.0)):
            codes, scores, prompt = greedy(ar, cond, text_tokens, penalty)
            out[f"{name}_tokens"], out[f"{name}_scores"] = codes, scores
        out["fake_prompt"] = prompt
        t_generate = time.perf_counter() - t1
        # api.py's reranking, greedy: stop-pad to max_mel_tokens (here STEPS), fix, score against the text.
        codes = F.pad(out["greedy_tokens"], (0, STEPS - out["greedy_tokens"].shape[1]), value=ar.stop_mel_token)
        for i in range(codes.shape[0]):
            codes[i] = fix_autoregressive_output(codes[i], ar.stop_mel_token, complain=False)
        out["ranked_codes"] = codes
        out["ranked_scores"] = clip(text_tokens.repeat(codes.shape[0], 1), codes, return_loss=False)
        fixed = fix_rows.clone()
        for i in range(fixed.shape[0]):
            fixed[i] = fix_autoregressive_output(fixed[i], ar.stop_mel_token, complain=False)
        out["fix_rows"], out["fixed_rows"] = fix_rows, fixed
        out["fixed_scores"] = clip(text_tokens.repeat(fixed.shape[0], 1), fixed, return_loss=False)
        out["clvp_sim"] = clip(text_tokens.repeat(n_rows, 1), speech_rows, return_loss=False)
        out["clvp_loss"] = clip(F.pad(loss_texts, (0, 1)), speech_rows, return_loss=True)

    import transformers
    out.update(mels=mels, text_ids=text_ids, cond_latent=cond, speech_rows=speech_rows, loss_texts=loss_texts,
               size=args.size, seed=args.seed, steps=STEPS, torch_version=str(torch.__version__),
               transformers_version=str(transformers.__version__))
    torch.save(out, os.path.join(args.out, "expected.pt"))
    t_total = time.perf_counter() - t0
    n_ar, n_clip = sum(p.numel() for p in ar.parameters()), sum(p.numel() for p in clip.parameters())
    print(f"oracle: {args.size}, seed {args.seed}: UnifiedVoice {n_ar / 1e6:.1f} M, CLVP {n_clip / 1e6:.1f} M "
          f"parameters; greedy {out['greedy_tokens'].shape[1]} tokens "
          f"(penalized {out['penalized_tokens'].shape[1]}); build+save {t_build:.1f} s, "
          f"generate {t_generate:.1f} s, total {t_total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
