"""bench.py: how fast clvp.py runs, measured against transformers on identical weights.

    python bench.py                        # clvp.py alone, official shapes, random weights
    python bench.py --compare              # and transformers' CLVP generate, interleaved, same process
    python bench.py --tiny --json          # a small model; one JSON object instead of the table
    python bench.py --compare --dtype float32 bfloat16 --tokens 400   # both dtypes, longer candidates
    python bench.py --sentences 8 --batch-size 64                     # 8 sentences together vs one at a time
    python bench.py --attention            # the decode step's attention six ways: why the caches are what they are
    python bench.py --speak --compare      # speak.py's audio stages against the original Tortoise code
    python bench.py --fast --compare       # speak.py --decoder hifigan: first audio, real-time factor, HiFi-GAN
    python bench.py --load                 # loading clvp.pt, from a fresh process to a model in memory

The whole job is timed (conditioning, prefill, decoding, reranking) on random weights with the stop
token banned, so every candidate runs exactly --tokens steps. Forward hooks on the decoder timestamp
every step, so the same code times clvp.py and transformers' ClvpModelForConditionalGeneration.generate.
The yardstick is the decode step's matrix products run bare: the same weights and shapes through
torch.matmul, with nothing else around them. Medians of --repeat runs, the implementations interleaved
so a machine that drifts hits both alike.
"""
import contextlib
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass

import torch

import clvp
import convert_weights
import speak


class PeakMemory:
    """Peak extra memory while a block runs: CUDA's max allocated, or on the CPU the process's peak RSS
    (Linux's VmHWM, reset on entry through /proc/self/clear_refs: no sampling thread to disturb timings)."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self.status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = self.status("VmHWM:") - self.base


def synchronizer(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed_run(run, decoder, device):
    """Run `run()` once with a hook on `decoder`: the first forward is the prefill, the others the steps."""
    marks, sync = [], synchronizer(device)

    def mark(*_):                                            # a forward hook must return None
        sync()
        marks.append(time.perf_counter())

    hook = decoder.register_forward_hook(mark)
    try:
        with PeakMemory(device) as mem:
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            end = time.perf_counter()
    finally:
        hook.remove()
    steps = len(marks) - 1
    return {"conditioning + prefill ms": (marks[0] - t0) * 1e3,
            "decode ms/step": (marks[-1] - marks[0]) / steps * 1e3,
            "rerank ms": (end - marks[-1]) * 1e3, "end to end s": end - t0, "peak memory MiB": mem.bytes / 2**20,
            "steps": steps}


def bare_matmul_ms(model, n, context, device, repeat=5):
    """One decode step's matrix products alone: every Linear of the decoder at batch n (with the weights
    packed as generation packs them), and attention's two products over `context` cached positions."""
    c, dec = model.config.decoder, model.decoder
    x = torch.randn(n, 1, c.dim, device=device, dtype=model.logit_scale.dtype)
    dtype = clvp.cache_dtype(device, x.dtype)
    q = torch.randn(n, c.heads, 1, c.dim // c.heads, device=device, dtype=dtype)
    kv = torch.randn(n, c.heads, context, c.dim // c.heads, device=device, dtype=dtype)
    hidden = torch.randn(n, 1, 4 * c.dim, device=device, dtype=x.dtype)

    def step():
        for b in dec.blocks:
            b.qkv(x), b.out(x), b.fc(x), b.proj(hidden)
            (q @ kv.transpose(2, 3)) @ kv
        dec.head(x)

    with clvp.packed_weights(dec, n):
        return best_ms(step, repeat, device)


def attention_choices(config, rows, device, contexts=(100, 500), repeat=3):
    """{cached positions: {way: ms}}: the attention of one decode step through every layer, six ways: torch's
    SDPA over a [positions, rows, heads, head_dim] cache (the layout before the shared prompt), in fp32 and
    bf16, and clvp.py's StepCache.attend with a 45-position prompt shared by all rows, in both. It is the
    measurement behind clvp.attention_dtype and clvp.cache_dtype."""
    c, sdpa, f32, b16 = config.decoder, torch.nn.functional.scaled_dot_product_attention, torch.float32, torch.bfloat16
    hd, layers, table, P = c.dim // c.heads, range(c.layers), {}, 45
    for n in contexts:
        q = torch.randn(rows, c.heads, 1, hd, device=device)
        k, v = (torch.randn(c.layers, n, rows, c.heads, hd, device=device).permute(0, 2, 3, 1, 4) for _ in range(2))
        q16, k16, v16 = (t.to(b16) for t in (q, k, v))
        ways = {"fp32 cache, fp32 SDPA": lambda: [sdpa(q, k[i], v[i]) for i in layers],
                "bf16 cache, bf16 SDPA": lambda: [sdpa(q16, k16[i], v16[i]) for i in layers],
                "bf16 cache, upcast, fp32 SDPA": lambda: [sdpa(q, k16[i].to(f32), v16[i].to(f32)) for i in layers]}
        for dtype, name in ((f32, "fp32"), (b16, "bf16")):
            prompts = clvp.PromptCache(c, 1, P, device, dtype)
            prompts.k.normal_(), prompts.v.normal_()
            cache = clvp.StepCache(prompts, torch.zeros(rows, dtype=torch.long, device=device), n - P + 1)
            cache.k.normal_(), cache.v.normal_()
            qd = q.to(dtype)
            ways[f"{name} shared-prompt cache, StepCache.attend"] = lambda cache=cache, qd=qd: [
                cache.attend(i, qd, qd, qd, n) for i in layers]
        table[n] = {way: best_ms(f, repeat, device) for way, f in ways.items()}
    return table


def attention_bytes(config, rows, contexts=(100, 500)):
    """What attention_choices allocates at its longest context: old-layout caches in fp32 and bf16, and the
    shared-prompt caches in both, keys and values."""
    c = config.decoder
    return 2 * c.layers * max(contexts) * rows * c.dim * (4 + 2) * 2


def reference_model(model):
    """transformers' CLVP holding exactly `model`'s weights, through convert_weights' own weight map."""
    from transformers import ClvpConfig, ClvpModelForConditionalGeneration
    c = model.config

    def encoder(e):
        return dict(vocab_size=e.vocab_size, hidden_size=e.dim, num_hidden_layers=e.layers,
                    num_attention_heads=e.heads, intermediate_size=e.ff_dim, projection_dim=e.projection_dim)

    d = c.decoder
    hf = ClvpConfig(text_config=encoder(c.text), speech_config=encoder(c.speech), projection_dim=c.text.projection_dim,
                    decoder_config=dict(hidden_size=d.dim, num_hidden_layers=d.layers, num_attention_heads=d.heads,
                                        num_mel_attn_blocks=d.conditioning_blocks))
    ref = ClvpModelForConditionalGeneration(hf).eval()
    ours, theirs = model.state_dict(), dict(ref.state_dict())
    for name, (how, source) in convert_weights.hf_weight_map(c).items():
        if how == "qkv":
            theirs.update(zip(source, ours[name].chunk(3)))
        else:
            theirs[source] = ours[name].T if how == "conv1d" else ours[name]
    ref.load_state_dict(theirs)
    return ref.to(model.logit_scale.device, model.logit_scale.dtype)


def texts_to_read(args, device):
    """args.sentences random texts, about args.text_tokens long (different lengths: the prompts get padded)."""
    lengths = [max(1, args.text_tokens - 3 * i % 10) for i in range(args.sentences)]
    return [torch.randint(3, 200, (n,), device=device) for n in lengths]


@dataclass
class Run:
    """One implementation to time: run(L) decodes L tokens per candidate."""
    name: str
    run: object               # L -> the generation
    decoder: torch.nn.Module  # the module whose forward hook marks each step
    model: clvp.DecoderAndCLVP = None   # ours, for the bytes read per step and the bare matrix products; None: transformers'
    rows: int = 0             # rows decoded together
    dtype: str = "float32"
    way: str = "alone"        # "alone", "together" or "one at a time" (with --sentences)


def runs_to_time(args, device):
    """[Run]: clvp.py in each --dtype (and, with --sentences, one sentence at a time as well as all together),
    and transformers in fp32 with --compare."""
    torch.manual_seed(0)
    base = clvp.DecoderAndCLVP(clvp.tiny_config() if args.tiny else clvp.Config()).to(device).eval()
    c = base.config.decoder
    with torch.no_grad():
        base.decoder.head.bias[c.stop_token] = -1e4      # run every one of the L steps (-1e9 is -inf in fp16)
    N, L, texts = args.candidates, args.tokens, texts_to_read(args, device)
    wav = 0.1 * torch.randn(clvp.CONDITIONING_SAMPLES, device=device)
    mels = clvp.log_mel_spectrogram(wav)[None]

    def options(L):                                          # the warm-up runs 2 tokens, the timed runs L
        return clvp.DecodingOptions(num_candidates=N, batch_size=args.batch_size or N * len(texts),
                                    max_new_tokens=L, pad_to_max=False, seed=0)
    runs, together = [], options(1).rows(len(texts))
    for dtype in args.dtype:
        model = copy.deepcopy(base).to(getattr(torch, dtype))
        m = mels.to(model.logit_scale.dtype)
        if len(texts) == 1:
            runs.append(Run(f"clvp.py {dtype}", lambda L, model=model, m=m: model.generate(texts[0], m, options(L)),
                            model.decoder, model, together, dtype))
            continue
        runs.append(Run(f"clvp.py {dtype}, {len(texts)} together", lambda L, model=model, m=m: model.generate(
            texts, m, options(L)), model.decoder, model, together, dtype, "together"))
        runs.append(Run(f"clvp.py {dtype}, one at a time", lambda L, model=model, m=m: [
            model.generate(t, m, options(L), batch_size=N) for t in texts], model.decoder, model, N, dtype,
            "one at a time"))
    if args.compare:
        import transformers
        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", module="transformers")
        # transformers 4.46's CLVP generate fails in bf16 on the CPU ("mat1 and mat2 must have the same dtype"),
        # so on the CPU it runs in fp32, its fastest working mode; on a GPU in the first --dtype.
        dtype = "float32" if device.type == "cpu" else args.dtype[0]
        ref, o = reference_model(base).to(getattr(torch, dtype)), options(L)

        def hf_generate(L):
            return [ref.generate(input_ids=t[None], input_features=mels.to(ref.dtype), do_sample=True,
                                 temperature=o.temperature, top_p=o.top_p, num_return_sequences=N,
                                 repetition_penalty=o.repetition_penalty, max_new_tokens=L, pad_token_id=c.stop_token,
                                 eos_token_id=c.stop_token, return_dict_in_generate=True) for t in texts]
        runs.append(Run(f"transformers {transformers.__version__} {dtype}", hf_generate, ref.speech_decoder_model,
                        rows=N, dtype=dtype))
    return runs


def ratio_pairs(runs):
    """(slower, faster) runs to compare: transformers against each clvp.py run, one sentence at a time against
    the same sentences decoded together, and clvp.py's first dtype against its others (one sentence)."""
    ours, theirs = [r for r in runs if r.model is not None], [r for r in runs if r.model is None]
    pairs = [(t, r) for t in theirs for r in ours]
    pairs += [(a, b) for a in ours for b in ours if a.way == "one at a time" and b.way == "together" and a.dtype == b.dtype]
    return pairs + [(ours[0], r) for r in ours[1:] if r.way == "alone"]


def bytes_per_step(model, rows, texts, prompt, steps):
    """(weights, KV cache) MiB that one decode step reads: the decoder's weights (the embeddings only a row
    each), each text's prompt once, and each row's `steps` own keys and values."""
    weights = sum(p.numel() * p.element_size() for name, p in model.decoder.named_parameters()
                  if "embedding" not in name and "positions" not in name)
    dtype = clvp.cache_dtype(model.logit_scale.device, model.logit_scale.dtype)
    return weights / 2**20, clvp.cache_bytes(model.config.decoder, rows, texts, prompt, steps, dtype) / 2**20


def stream_gbps(device, repeat=7):
    """The memory bandwidth this machine reaches reading 1 GiB (torch's sum, every thread), GB/s: the median
    of `repeat` reads (the fastest can be an outlier on a virtual machine)."""
    x = torch.ones(2**28, device=device)
    return statistics.median(x.numel() * 4 / best_ms(lambda: x.sum(), 1, device) / 1e6 for _ in range(repeat))


def cpu_facts():
    """What decides clvp.py's CPU paths: the model name, torch's capability, AVX-512 BF16 and AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        name = "?"
    return dict(model=name, capability=torch.backends.cpu.get_cpu_capability(),
                avx512_bf16=torch.cpu._is_avx512_bf16_supported(), amx=torch.cpu._is_amx_tile_supported())


def benchmark(args, device):
    runs = runs_to_time(args, device)
    N, L, K = args.candidates, args.tokens, args.sentences
    results = {r.name: [] for r in runs}
    prompt = 1 + args.text_tokens + 4                                       # latent, text + 3, start
    context = prompt + L // 2                                               # cached positions, on average
    with torch.inference_mode():
        for r in runs:
            r.run(2)                                                        # warm-up
        for _ in range(args.repeat):
            for r in runs:
                results[r.name].append(timed_run(lambda: r.run(L), r.decoder, device))
        bare = {r.name: bare_matmul_ms(r.model, N, context, device) for r in runs if r.model is not None and K == 1}
        gbps = stream_gbps(device)
    table = {}
    for r in runs:
        name, rs = r.name, results[r.name]
        table[name] = row = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        row["candidate-tokens/s"] = K * N * L / row["end to end s"]
        if K > 1:          # the hooks time steps of one batch; with several, end to end is what counts
            row = table[name] = {k: row[k] for k in ("end to end s", "peak memory MiB", "candidate-tokens/s")}
        else:
            row["decode candidate-tokens/s"] = N / row["decode ms/step"] * 1e3
        if name in bare:
            row["bare matmul ms/step"] = bare[name]
            row["decode / bare matmul"] = row["decode ms/step"] / bare[name]
        if r.model is not None:
            texts = max(1, min(K, r.rows // N))                            # whose prompts a batch reads
            weights, cache = bytes_per_step(r.model, r.rows, texts, prompt, L // 2)
            row["weights MiB read/step"], row["KV cache MiB read/step"] = weights, cache
            if K == 1:
                row["floor ms/step"] = (weights + cache) * 2**20 / gbps / 1e6
                row["decode / floor"] = row["decode ms/step"] / row["floor ms/step"]
    report = dict(device=str(device), cpu=cpu_facts() if device.type == "cpu" else None, stream_GB_per_s=gbps,
                  cache_dtype={d: str(clvp.cache_dtype(device, getattr(torch, d)))[6:] for d in args.dtype},
                  packed={d: clvp.can_pack(torch.empty(0, device=device, dtype=getattr(torch, d))) for d in args.dtype},
                  dtype=args.dtype, config="tiny" if args.tiny else "official",
                  candidates=N, tokens=L, text_tokens=args.text_tokens, sentences=K, batch_size=args.batch_size or N * K,
                  repeat=args.repeat, torch=torch.__version__, threads=torch.get_num_threads(), results=table)
    # Speed-ups, slower / faster.
    report["ratios"] = {f"{slow.name} / {fast.name}": {k: table[slow.name][k] / table[fast.name][k] for k in RATIO_ROWS
                                                       if table[fast.name].get(k)} for slow, fast in ratio_pairs(runs)}
    if args.compare:
        report["front ends"] = front_end_speed(device)
    return report


RATIO_ROWS = ("conditioning + prefill ms", "decode ms/step", "rerank ms", "end to end s", "peak memory MiB")


def print_report(report):
    table = report["results"]
    print(f"benchmark: {report['config']} config, {report['device']}, N={report['candidates']} candidates, "
          f"L={report['tokens']} tokens, {report['sentences']} sentence(s) of about {report['text_tokens']} text "
          f"tokens, batches of {report['batch_size']} rows, median of {report['repeat']}, torch {report['torch']}, "
          f"{report['threads']} threads")
    print(f"cpu: {report['cpu']}" if report["cpu"] else "", f"stream {report['stream_GB_per_s']:.1f} GB/s, KV cache "
          f"{report['cache_dtype']}, weights packed for oneDNN {report['packed']}")
    rows = list(dict.fromkeys(row for r in table.values() for row in r if row != "steps"))
    for name, r in table.items():
        print(f"\n{name}")
        for row in rows:
            if row in r:
                print(f"  {row:30}{r[row]:>12.2f}")
    for pair, ratios in report["ratios"].items():
        print(f"\n{pair}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    for name, (ours_ms, theirs_ms, what) in report.get("front ends", {}).items():
        print(f"\n{name}: clvp.py {ours_ms:.2f} ms, transformers {theirs_ms:.2f} ms, {theirs_ms / ours_ms:.2f}x ({what})")


def best_ms(f, repeat, device=torch.device("cpu")):
    """The fastest of `repeat` calls of f, after one warm-up call (waiting for the GPU, on one)."""
    sync = synchronizer(device)
    f()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def front_end_speed(device, repeat=20):
    """Tokenizer and log-mel against transformers' ClvpTokenizer and ClvpFeatureExtractor (best of `repeat`)."""
    from transformers import ClvpFeatureExtractor, ClvpTokenizer
    tokenizer = clvp.Tokenizer.from_file(os.path.join(clvp.DATA, "tokenizer.json"))
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as f:
        text, what = " ".join(f.read().split("\n")), "this project's README"
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(tokenizer.vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in tokenizer.merges) + "\n")
        theirs = ClvpTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    wav = 0.1 * torch.randn(clvp.CONDITIONING_SAMPLES)
    extractor = ClvpFeatureExtractor()
    fresh = lambda: clvp.Tokenizer(tokenizer.vocab, tokenizer.merges).encode(text)    # no warm word cache
    return {"tokenizer encode": (best_ms(fresh, repeat), best_ms(lambda: theirs(text), repeat),
                                 f"{len(text)} chars of {what}"),
            "log-mel (6 s clip)": (best_ms(lambda: clvp.log_mel_spectrogram(wav.to(device)), repeat, device),
                                   best_ms(lambda: extractor(wav.numpy(), sampling_rate=clvp.SAMPLE_RATE), repeat),
                                   "one clip")}


def tortoise_source(what):
    """The unpacked tortoise-tts 3.0.0 source: $CLVP_TORTOISE_SRC, or where the tests unpack it."""
    src = os.environ.get("CLVP_TORTOISE_SRC") or os.path.expanduser("~/.cache/clvp-test/tortoise-tts-3.0.0")
    clvp.require([(os.path.isdir(os.path.join(src, "tortoise")), f"{what} needs the tortoise-tts 3.0.0 source in "
                   f"{src} (pip download --no-deps tortoise-tts==3.0.0, unpack, set CLVP_TORTOISE_SRC)")])
    return src


def original_audio_models(diffusion, vocoder):
    """Tortoise's own DiffusionTts and UnivNetGenerator at the official size, holding exactly speak.py's
    weights. They need the tortoise-tts 3.0.0 source and einops; torchaudio, which arch_util imports but this
    path never calls, is stubbed."""
    src = tortoise_source("--speak --compare")
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    sys.path.insert(0, src)
    from tortoise.models.diffusion_decoder import DiffusionTts
    from tortoise.models.vocoder import UnivNetGenerator
    theirs = DiffusionTts(model_channels=1024, num_layers=10, in_channels=100, out_channels=200, in_latent_channels=1024,
                          in_tokens=8193, dropout=0, use_fp16=False, num_heads=16, layer_drop=0, unconditioned_percentage=0)
    ours = diffusion.state_dict()                            # their names -> ours, as the converter renames them
    names = convert_weights.speak_names("diffusion", {k: k for k in theirs.state_dict()})
    clvp.require([(set(ours) <= set(names), f"speak.py has tensors the original lacks: {sorted(set(ours) - set(names))[:3]}")])
    theirs.load_state_dict({names[k]: v for k, v in ours.items()}, strict=False)   # code_embedding & co.: training only
    univnet = UnivNetGenerator()
    univnet.remove_weight_norm()
    names = convert_weights.speak_names("vocoder", {k: k for k in univnet.state_dict()})
    univnet.load_state_dict({names[k]: v for k, v in vocoder.state_dict().items()})
    univnet.eval()                                           # the original's eval() returns None
    return theirs.eval(), univnet


PEAK_CHILD = """
import sys, torch
import bench, speak
which, L = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
diffusion, vocoder = speak.random_speak(speak.DiffusionConfig(), torch.device("cpu"))
x, t, cond, z = torch.randn(1, 100, L), torch.tensor([1000]), torch.randn(1, 1024, L), torch.randn(1, 64, L + 10)
if which == "original":
    diffusion, vocoder = bench.original_audio_models(diffusion, vocoder)
with bench.PeakMemory(torch.device("cpu")) as peak, torch.inference_mode():
    for _ in range(3):                                 # three network passes, then UnivNet
        diffusion(x, t, precomputed_aligned_embeddings=cond) if which == "original" else diffusion(x, t, cond)
    vocoder.inference(speak.denormalize(torch.tanh(x)), z)
print(peak.bytes)
"""


def audio_peaks(frames, compare):
    """{implementation: peak MiB above its loaded models} of three diffusion passes and UnivNet (activations and
    caches), each in a fresh process: in this one, earlier rows' freed memory would hide it."""
    peaks = {}
    for which in ("speak.py", "original") if compare else ("speak.py",):
        r = subprocess.run([sys.executable, "-c", PEAK_CHILD, which, str(frames)], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        clvp.require([(r.returncode == 0, f"the {which} memory run failed: {clvp.first_line(r.stderr or '?')}")])
        peaks[which] = round(int(r.stdout.strip().splitlines()[-1]) / 2**20)
    return peaks


def audio_rows(args):
    """{row: {"speak.py s": ..., "original s": ...}} at args.seconds of audio, best of --repeat, fp32 CPU: one
    network pass, a guided step (speak.py: one batch of 2; the original: two calls), the samplers, the vocoder,
    and speak.py's pass, vocoder and sampler in bf16 against the original in fp32."""
    torch.manual_seed(0)
    diffusion, vocoder = speak.random_speak(speak.DiffusionConfig(), torch.device("cpu"))
    theirs = original_audio_models(diffusion, vocoder) if args.compare else None
    L = int(args.seconds * speak.SAMPLE_RATE / clvp.HOP)                          # mel frames
    x, cond, t = torch.randn(1, 100, L), torch.randn(1, 1024, L), torch.tensor([1000])
    mel, z = torch.rand(1, 100, L) * 2 - 1, torch.randn(1, 64, L + 10)
    s80 = speak.Schedule(80)

    def ms(f, repeat=args.repeat):                   # seconds, best of `repeat`; the models were made outside
        with torch.inference_mode():                 # inference mode, as their position-bias cache needs
            return best_ms(f, repeat) / 1e3
    rows = {"one network pass": (ms(lambda: diffusion(x, t, cond)),
                                 theirs and ms(lambda: theirs[0](x, t, precomputed_aligned_embeddings=cond))),
            "guided step (conditioned + free)": (ms(lambda: speak.guided_eps(diffusion, s80, 40, x, cond, 2.0)),
                                                 theirs and ms(lambda: (theirs[0](x, t, precomputed_aligned_embeddings=cond),
                                                               theirs[0](x, t, precomputed_aligned_embeddings=cond, conditioning_free=True)))),
            "vocoder": (ms(lambda: vocoder.inference(speak.denormalize(mel), z)),
                        theirs and ms(lambda: theirs[1].inference(speak.denormalize(mel), z)))}
    for name, steps, guidance, sampler in (("ultra_fast, 30 steps", 30, 0.0, "ddpm"), ("ddim, 20 steps", 20, 0.0, "ddim"),
                                           ("ddim, 10 steps", 10, 0.0, "ddim")):
        rows[name] = (ms(lambda: speak.sample_mel(diffusion, cond, steps, guidance, sampler=sampler), 1), None)
    # bf16 (the sampler's own math stays fp32): against the original in fp32, the only way it runs on a CPU
    d16, v16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (diffusion, vocoder))
    x16, cond16 = x.bfloat16(), cond.bfloat16()
    rows["one network pass, bf16 (original: fp32)"] = (ms(lambda: d16(x16, t, cond16)), rows["one network pass"][1])
    rows["vocoder, bf16 (original: fp32)"] = (ms(lambda: v16.inference(speak.denormalize(mel).bfloat16(), z.bfloat16())),
                                             rows["vocoder"][1])
    rows["ultra_fast, 30 steps, bf16"] = (ms(lambda: speak.sample_mel(d16, cond16, 30), 1), None)
    pass_s, total = rows["one network pass"][1], rows["ultra_fast, 30 steps"][0] + rows["vocoder"][0]
    if pass_s:           # the original's sampler is its network pass N times; its step math costs next to nothing
        rows["ultra_fast, 30 steps (original: 30 x one pass)"] = (rows.pop("ultra_fast, 30 steps")[0], 30 * pass_s)
        rows["ultra_fast, 30 steps, bf16 (original: fp32, 30 x one pass)"] = (rows.pop("ultra_fast, 30 steps, bf16")[0],
                                                                             30 * pass_s)
    table = {name: {"speak.py s": ours, **({"original s": orig, "speed-up": orig / ours} if orig else {})}
             for name, (ours, orig) in rows.items()}
    return dict(seconds_of_audio=args.seconds, frames=L, threads=torch.get_num_threads(), torch=torch.__version__,
                rows=table, real_time_factor_ultra_fast=total / args.seconds,
                peak_mib_above_the_models=audio_peaks(L, args.compare))


def original_hifigan(hifigan):
    """tortoise 3.0's own HifiganGenerator at api_fast.py's size, holding speak.py's weights under weight norm
    (g = |w| per row, v = w), as api_fast.py runs it: it never removes the weight norm. Its inference() moves
    its input to "cuda"; tortoise_oracle.import_hifigan patches that one line, for the CPU."""
    import tortoise_oracle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # torch's deprecated (old-style) weight_norm
        theirs = tortoise_oracle.import_hifigan(tortoise_source("--fast --compare"))(
            in_channels=1024, out_channels=1, resblock_type="1", resblock_dilation_sizes=[[1, 3, 5]] * 3,
            resblock_kernel_sizes=[3, 7, 11], upsample_kernel_sizes=[16, 16, 4, 4], upsample_initial_channel=512,
            upsample_factors=[8, 8, 2, 2], cond_channels=1024)
    state = {}
    for name, w in hifigan.state_dict().items():
        if name.endswith("weight") and not name.startswith("cond_layer"):
            state[name + "_v"], state[name + "_g"] = w, w.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
        else:
            state[name] = w
    theirs.load_state_dict(state)
    return theirs.eval()


def fast_rows(args, device):
    """speak.py --decoder hifigan at the official size on random weights, the stop token banned so that every
    candidate makes exactly --tokens codes: time to the first audio and wall seconds per second of audio, at 1
    and 16 candidates and streamed, in each --dtype; the decode step at one row against its floor (the weights'
    bytes at the bandwidth measured here); HiFi-GAN alone, and with --compare against the original's."""
    clvp.require([(not (args.tiny and args.compare), "--fast --compare needs the official size (the original's "
                   "HiFi-GAN reads 1024-wide latents)")])
    torch.manual_seed(0)
    base = clvp.add_front_end(clvp.DecoderAndCLVP(clvp.tiny_config() if args.tiny else clvp.Config())).to(device).eval()
    width = base.config.decoder.dim
    with torch.no_grad():
        base.decoder.head.bias[base.config.decoder.stop_token] = -1e4
    hifigan32 = speak.HifiGan(width, 32 if args.tiny else speak.HIFI_CHANNELS).to(device).eval()
    L, ids = args.tokens, texts_to_read(args, device)[0]
    mels = clvp.log_mel_spectrogram(0.1 * torch.randn(clvp.CONDITIONING_SAMPLES, device=device))[None]
    gbps, rows = stream_gbps(device), {}
    for dtype in args.dtype:
        model = copy.deepcopy(base).to(getattr(torch, dtype))
        hifigan = copy.deepcopy(hifigan32).to(speak.hifigan_dtype(device, model.logit_scale.dtype))   # as speak.py
        m = mels.to(model.logit_scale.dtype)
        for name, n in (("1 candidate", 1), ("16 candidates", 16), ("streamed", 1)):
            o = clvp.DecodingOptions(num_candidates=n, batch_size=n, max_new_tokens=L, sample_top_k=50, seed=0)
            fast_path_run(model, hifigan, ids, m, dataclasses.replace(o, max_new_tokens=2), name == "streamed")
            rows[f"{name}, {dtype}"] = fast_path_run(model, hifigan, ids, m, o, name == "streamed")
        weights = sum(p.numel() * p.element_size() for n, p in model.decoder.named_parameters()
                      if "embedding" not in n and "positions" not in n)
        for engine in ("fast", "lesson"):
            ms = one_row_step_ms(model, ids, m, engine)
            rows[f"decode step at one row, {dtype}, {engine} engine"] = {
                "ms": ms, "floor ms": weights / gbps / 1e6, "step / floor": ms * gbps * 1e6 / weights,
                "weights MiB": weights / 2**20}
    latents, voice = torch.randn(1, L, width, device=device), torch.randn(1, width, device=device)
    seconds = len(speak.hifigan_decode(hifigan32, latents, voice)) / speak.SAMPLE_RATE
    with torch.inference_mode():
        ours = best_ms(lambda: speak.hifigan_decode(hifigan32, latents, voice), args.repeat, device) / 1e3
        h16 = copy.deepcopy(hifigan32).bfloat16()
        ours16 = best_ms(lambda: speak.hifigan_decode(h16, latents, voice), args.repeat, device) / 1e3
        theirs = original_hifigan(hifigan32) if args.compare else None
        orig = theirs and best_ms(lambda: theirs.inference(latents, voice), args.repeat, device) / 1e3
    rows[f"HiFi-GAN alone, {seconds:.1f} s of audio"] = {"speak.py fp32 s": ours, "speak.py bf16 s": ours16,
                                                          **({"original fp32 s": orig, "speed-up fp32": orig / ours}
                                                             if orig else {})}
    return dict(device=str(device), cpu=cpu_facts() if device.type == "cpu" else None, stream_GB_per_s=gbps, tokens=L,
                audio_seconds_per_token=1024 / clvp.SAMPLE_RATE, torch=torch.__version__,
                threads=torch.get_num_threads(), rows=rows)


@torch.inference_mode()
def fast_path_run(model, hifigan, ids, mels, options, streamed):
    """One speak.py --decoder hifigan run, in process -> time to the first audio, seconds per second of audio."""
    t0 = time.perf_counter()
    if streamed:
        first, samples = None, 0
        for chunk in speak.stream(model, hifigan, ids, model.voice_latent(mels)[None], options):
            first, samples = first or time.perf_counter() - t0, samples + len(chunk)
    else:
        gen = model.generate(ids, mels, options)
        codes = speak.spoken_codes(gen, options, model.config.decoder.stop_token)
        samples = len(speak.speak_fast(model, hifigan, ids, model.voice_latent(mels)[None], codes))
        first = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    return {"first audio s": first, "wall s": wall, "audio s": samples / speak.SAMPLE_RATE,
            "real-time factor": wall / (samples / speak.SAMPLE_RATE)}


@torch.inference_mode()
def one_row_step_ms(model, ids, mels, engine, steps=30):
    """The stream's decode step, ms: one row through the lesson's KV cache, on the engine's packed weights or not."""
    dec, c = model.decoder, model.decoder.config
    prompt = dec.prompt(model.voice_latent(mels)[None], ids[None])
    P, token = prompt.shape[1], torch.tensor([[5]], device=prompt.device)
    cache = clvp.KVCache.empty(c, 1, P + 2 * steps, prompt.device, prompt.dtype)
    with clvp.packed_weights(dec, 1) if engine == "fast" else contextlib.nullcontext():
        dec(prompt, cache)
        times = []
        for k in range(2 * steps):
            t0 = time.perf_counter()
            dec.logits(dec(dec.embed_speech(token, clvp.speech_position(k + 1)), cache, P + k)[:, -1])
            times.append(time.perf_counter() - t0)
    return statistics.median(times[steps:]) * 1e3            # the first half warms up


def build_parser():
    p = clvp.ArgumentParser(prog="bench.py", description="Time clvp.py's generate-and-rank on random weights "
                            "(and transformers' with --compare).")
    p.add_argument("--compare", action="store_true", help="also time transformers' generate on the same weights")
    p.add_argument("--tiny", action="store_true", help="a small model instead of the official shapes")
    p.add_argument("--candidates", type=int, default=16, help="candidates per sentence (default 16)")
    p.add_argument("--sentences", type=int, default=1, help="sentences read; with more than one, clvp.py decodes "
                   "them together and one at a time (default 1)")
    p.add_argument("--batch-size", type=int, help="rows decoded together (default: every candidate of every sentence)")
    p.add_argument("--tokens", type=int, default=100, help="decode steps per candidate (default 100)")
    p.add_argument("--text-tokens", type=int, default=40, help="text length in tokens (default 40)")
    p.add_argument("--repeat", type=int, default=3, help="runs per implementation; the median is reported")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"],
                   help="clvp.py's dtype(s), each timed in turn (default float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--fast", action="store_true", help="only time speak.py --decoder hifigan: first audio, real-time "
                   "factor, the one-row decode step against its floor, HiFi-GAN alone (with --compare: against the original's)")
    p.add_argument("--speak", action="store_true", help="only time speak.py's audio stages (fp32, CPU; with --compare "
                   "against the original's DiffusionTts and UnivNet), at --seconds of audio")
    p.add_argument("--seconds", type=float, default=3.0, help="audio length for --speak (default 3)")
    p.add_argument("--load", action="store_true", help="only time load_model, from a fresh process to a model in "
                   "memory, on a clvp.pt of random weights (official shapes, or --tiny), --repeat times")
    p.add_argument("--attention", action="store_true", help="only time a decode step's attention in fp32 and bf16, "
                   "four ways, at 100 and 500 cached positions (ms, all layers, --candidates rows)")
    return p


LOAD_CHILD = """
import sys, time
import bench, clvp, torch
with bench.PeakMemory(torch.device("cpu")) as peak:
    start = time.perf_counter()
    model = clvp.load_model(sys.argv[1], "cpu")
    seconds = time.perf_counter() - start
print(seconds, peak.bytes, sum(t.nbytes for t in model.state_dict().values()))
"""


def load_rows(args):
    """--load: load_model on a clvp.pt of random fp32 weights (the official shapes, or --tiny) written to a
    temporary folder, each run in a fresh process: seconds and peak MiB above the process's baseline (the
    median of --repeat), beside the weights' MiB."""
    config = clvp.tiny_config() if args.tiny else clvp.Config()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clvp.pt")
        weights = {k: torch.randn(shape) * 0.02 for k, shape in clvp.expected_shapes(config).items()}
        weights["logit_scale"] = torch.tensor(1.0)
        clvp.save_checkpoint(path, config, weights, mel_norms=clvp.read_mel_norms(clvp.SHIPPED[1]))
        del weights
        with open(path, "rb") as f:                      # on disk, then in the page cache: no run waits on
            os.fsync(f.fileno())                         # the writing, each reads from memory
            while f.read(2**24):
                pass
        runs = []
        for _ in range(args.repeat):
            r = subprocess.run([sys.executable, "-c", LOAD_CHILD, path], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
            clvp.require([(r.returncode == 0, f"the load run failed: {clvp.first_line(r.stderr or '?')}")])
            runs.append([float(x) for x in r.stdout.split()])
        size = os.path.getsize(path)
    seconds, peak, weights = (statistics.median(run[i] for run in runs) for i in range(3))
    return {"cpu": cpu_facts(), "file MiB": round(size / 2**20), "weights MiB": round(weights / 2**20),
            "load s": round(seconds, 3), "peak memory MiB": round(peak / 2**20), "runs": args.repeat}


def measure(args):
    clvp.require([clvp.within("--candidates", args.candidates, 1, 1024), clvp.within("--sentences", args.sentences, 1, 64),
                  clvp.within("--batch-size", args.batch_size or 1, 1, 4096),
                  (len(set(args.dtype)) == len(args.dtype), "--dtype: each dtype once"),
                  clvp.within("--tokens", args.tokens, 2, 600),            # at least one decode step to time
                  clvp.within("--text-tokens", args.text_tokens, 1, 400), clvp.within("--repeat", args.repeat, 1, 100)])
    with clvp.prefixed("--device: "):
        device = clvp.resolve_device(args.device)
    if args.fast:
        print(json.dumps(fast_rows(args, device), indent=None if args.json else 1))
        return 0
    if args.speak:
        clvp.require([(1 <= args.seconds <= 30, f"--seconds must be in 1..30, not {args.seconds}")])
        report = audio_rows(args)
        print(json.dumps(report, indent=None if args.json else 1))
        return 0
    if args.load:
        print(json.dumps(load_rows(args), indent=None if args.json else 1))
        return 0
    if args.attention:
        config, free = clvp.tiny_config() if args.tiny else clvp.Config(), clvp.free_memory(device)
        need = attention_bytes(config, args.candidates)
        clvp.require([(free is None or need <= 0.75 * free, f"--attention with --candidates {args.candidates} needs "
                       f"{need / 2**30:.1f} GiB, more than 3/4 of the {(free or 0) / 2**30:.1f} GiB free")])
        report = {f"{n} positions": ways for n, ways in attention_choices(config, args.candidates, device).items()}
    else:
        report = benchmark(args, device)
    if args.json or args.attention:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def main(argv=None):
    return clvp.run_command("bench.py", lambda: measure(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
