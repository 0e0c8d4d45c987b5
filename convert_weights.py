"""convert_weights.py: official CLVP checkpoints -> the single file clvp.py loads.

    python convert_weights.py --hf DIR -o clvp.pt [--dtype float16]

DIR is what transformers' `ClvpModelForConditionalGeneration.save_pretrained` writes: config.json and
model.safetensors or pytorch_model.bin (sharded or not), plus, when present, the tokenizer's
vocab.json/merges.txt and the feature extractor's preprocessor_config.json (which holds mel_norms).

Every tensor is renamed into clvp.py's layout by a table (hf_weight_map). The only arithmetic is
layout: separate q/k/v projections are stacked into one [q; k; v] matrix, and GPT-2's Conv1D weights,
stored [in, out], are transposed into Linear's [out, in]. Nothing is unpickled: safetensors files are
read by a few lines below and .bin files with torch.load(weights_only=True).
"""
import argparse
import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

import clvp


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------------
# Reading tensors without unpickling
# ---------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file is an 8-byte header length, a JSON header, then raw little-endian bytes."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            raw = bytearray(data[8 + n + start:8 + n + end])
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def read_torch(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: cannot be read as plain tensors ({reason[:200]}); "
                              "files that need to unpickle code are refused") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: not a state dict of tensors")
    return state


def read_hf_weights(directory):
    """All tensors of a save_pretrained directory, sharded or not."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch)):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(reader(os.path.join(directory, shard)))
            return state
    for name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", read_torch)):
        if os.path.exists(os.path.join(directory, name)):
            return reader(os.path.join(directory, name))
    raise ConversionError(f"{directory}: no weights found (expected model.safetensors or pytorch_model.bin)")


# ---------------------------------------------------------------------------------------------------
# The Hugging Face layout
# ---------------------------------------------------------------------------------------------------


def hf_config(d):
    """transformers' ClvpConfig dict -> clvp.Config."""
    dec = d["decoder_config"]

    def encoder(e):
        # The port derives the rotary width from the projection width, with a floor of 32 dims.
        return clvp.EncoderConfig(
            vocab_size=e["vocab_size"], dim=e["hidden_size"], layers=e["num_hidden_layers"],
            heads=e["num_attention_heads"], ff_dim=e["intermediate_size"],
            rotary_dim=max(e["projection_dim"] // (e["num_attention_heads"] * 2), 32),
            projection_dim=e["projection_dim"])

    return clvp.Config(
        clvp.DecoderConfig(
            dim=dec["hidden_size"], layers=dec["num_hidden_layers"], heads=dec["num_attention_heads"],
            speech_vocab_size=dec["vocab_size"], speech_positions=dec["max_position_embeddings"],
            start_token=dec["bos_token_id"], stop_token=dec["eos_token_id"],
            text_vocab_size=d["text_config"]["vocab_size"], text_positions=dec["max_text_tokens"],
            text_start_token=d["text_config"]["bos_token_id"], text_stop_token=d["text_config"]["eos_token_id"],
            mel_channels=dec["feature_size"], conditioning_blocks=dec["num_mel_attn_blocks"]),
        encoder(d["text_config"]), encoder(d["speech_config"]))


def hf_weight_map(config):
    """clvp name -> (how, source names). how: 'copy', 'qkv' (stack q, k, v) or 'conv1d' (transpose)."""
    m = {"logit_scale": ("copy", "logit_scale")}
    ce, dec = "conditioning_encoder.", "speech_decoder_model.model.decoder."

    def linear(ours, theirs, bias=True):
        m[ours + ".weight"] = ("copy", theirs + ".weight")
        if bias:
            m[ours + ".bias"] = ("copy", theirs + ".bias")

    def qkv(ours, theirs, bias=True):
        for p in ("weight", "bias") if bias else ("weight",):
            m[f"{ours}.{p}"] = ("qkv", [f"{theirs}.{x}_proj.{p}" for x in "qkv"])

    linear("conditioning.conv", ce + "mel_conv")
    for i in range(config.decoder.conditioning_blocks):
        linear(f"conditioning.blocks.{i}.norm", f"{ce}group_norms.{i}")
        qkv(f"conditioning.blocks.{i}.qkv", f"{ce}mel_attn_blocks.{i}")
        linear(f"conditioning.blocks.{i}.out", f"{ce}mel_attn_blocks.{i}.out_proj")
    m["decoder.text_embedding.weight"] = ("copy", ce + "text_token_embedding.weight")
    m["decoder.text_positions.weight"] = ("copy", ce + "text_position_embedding.weight")
    m["decoder.speech_embedding.weight"] = ("copy", dec + "input_embeds_layer.weight")
    m["decoder.speech_positions.weight"] = ("copy", dec + "position_embeds_layer.weight")
    for i in range(config.decoder.layers):
        ours, theirs = f"decoder.blocks.{i}.", f"{dec}layers.{i}."
        linear(ours + "norm1", theirs + "input_layernorm")
        qkv(ours + "qkv", theirs + "attn")
        linear(ours + "out", theirs + "attn.out_proj")
        linear(ours + "norm2", theirs + "post_attention_layernorm")
        for name, conv in (("fc", "c_fc"), ("proj", "c_proj")):
            m[f"{ours}{name}.weight"] = ("conv1d", f"{theirs}mlp.{conv}.weight")
            m[f"{ours}{name}.bias"] = ("copy", f"{theirs}mlp.{conv}.bias")
    linear("decoder.norm", dec + "layer_norm")
    linear("decoder.final_norm", "speech_decoder_model.final_norm")
    linear("decoder.head", "speech_decoder_model.lm_head")
    for side, c in (("text", config.text), ("speech", config.speech)):
        ours, theirs = f"{side}_encoder.", f"{side}_encoder_model."
        m[ours + "embedding.weight"] = ("copy", theirs + "token_embedding.weight")
        for i in range(c.layers):
            b, t = f"{ours}blocks.{i}.", f"{theirs}layers.{i}."
            m[b + "norm1.weight"] = ("copy", t + "input_rmsnorm.weight")
            qkv(b + "qkv", t + "self_attn", bias=False)
            linear(b + "out", t + "self_attn.out_proj")
            m[b + "norm2.weight"] = ("copy", t + "post_attention_rmsnorm.weight")
            linear(b + "ff_in", t + "mlp.fc1.proj")
            linear(b + "ff_out", t + "mlp.fc2")
        linear(ours + "norm", theirs + "final_layer_norm")
        m[ours + "projection.weight"] = ("copy", theirs + "projection.weight")
    return m


# Tensors of the port that are not weights: rotary frequencies are recomputed, attention-mask buffers
# are rebuilt by scaled_dot_product_attention.
HF_IGNORED_SUFFIXES = ("rotary_pos_emb.inv_freq", ".bias_mask", "attn.bias", "attn.masked_bias")


def apply_weight_map(weight_map, state, source):
    """Build clvp's state dict from `state`; one error names every source tensor that is missing."""
    missing = sorted({n for _, names in weight_map.values() for n in ([names] if isinstance(names, str) else names)
                      if n not in state})
    if missing:
        raise ConversionError(f"{source}: {len(missing)} tensor(s) missing: " + ", ".join(missing))
    out = {}
    for ours, (how, names) in weight_map.items():
        if how == "copy":
            out[ours] = state[names]
        elif how == "conv1d":
            out[ours] = state[names].T
        else:
            out[ours] = torch.cat([state[n] for n in names], dim=0)
    return out


def convert_hf(directory):
    """A save_pretrained directory -> (config, weights, tokenizer or None, mel_norms or None)."""
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: not a directory")
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            config = hf_config(json.load(f))
    except FileNotFoundError:
        raise ConversionError(f"{config_path}: missing (is this a transformers CLVP directory?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{config_path}: not a CLVP config ({type(e).__name__}: {e})") from None
    state = read_hf_weights(directory)
    weight_map = hf_weight_map(config)
    used = {n for _, names in weight_map.values() for n in ([names] if isinstance(names, str) else names)}
    unexpected = [k for k in state if k not in used and not k.endswith(HF_IGNORED_SUFFIXES)]
    if unexpected:
        raise ConversionError(f"{directory}: {len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected))
    weights = apply_weight_map(weight_map, state, directory)
    with torch.device("meta"):
        expected = clvp.CLVP(config).state_dict()
    try:
        clvp.check_weights(expected, weights, directory)
    except clvp.CheckpointError as e:
        raise ConversionError(str(e)) from None
    tokenizer = None
    if os.path.exists(os.path.join(directory, "vocab.json")):
        tokenizer = clvp.Tokenizer.from_file(directory)
    mel_norms = None
    pre = os.path.join(directory, "preprocessor_config.json")
    if os.path.exists(pre):
        with open(pre) as f:
            mel_norms = json.load(f).get("mel_norms")
    return config, weights, tokenizer, mel_norms


# ---------------------------------------------------------------------------------------------------
# Fetching the official files: streamed to NAME.part, resumed with HTTP Range after a dropped
# connection, size-checked, renamed to NAME only when complete, retried on transient errors.
# ---------------------------------------------------------------------------------------------------


class DownloadError(ConversionError):
    """A file that could not be fetched; the message names the URL or the host."""


# Where Tortoise itself gets them: the weights from its Hugging Face repository, the tokenizer and
# the mel normalization from its source tree. CLVP_HUB_URL=<base> fetches all four from <base>/<name>.
HUB_URL = "https://huggingface.co/jbetker/tortoise-tts-v2/resolve/main/.models"
SOURCE_URL = "https://raw.githubusercontent.com/neonbjb/tortoise-tts/main/tortoise/data"
OFFICIAL_FILES = {
    "autoregressive.pth": HUB_URL,   # GPT-2 speech decoder and conditioning encoder
    "clvp2.pth": HUB_URL,            # the text and speech encoders
    "tokenizer.json": SOURCE_URL,    # the text BPE
    "mel_norms.pth": SOURCE_URL,     # per-band divisors of the log-mel spectrogram
}
CHUNK = 2**20    # bytes read and written at a time
TIMEOUT = 30     # seconds without a byte before a try counts as failed


def official_urls():
    base = os.environ.get("CLVP_HUB_URL", "").rstrip("/")
    return {name: f"{base or default}/{name}" for name, default in OFFICIAL_FILES.items()}


def cache_dir():
    return os.environ.get("CLVP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clvp")


class _Incomplete(Exception):
    """A try that ended early; worth another, which resumes from the .part file."""


def _fetch(url, part, progress):
    """One request, appending to `part`. Returns once `part` holds the whole file."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # 416: nothing lies past byte `have`. The .part is whole if the size the server gives agrees.
        total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        e.close()
        if total == str(have):
            return
        os.remove(part)
        raise _Incomplete(f"{part} does not match the file on the server; starting over") from None
    with response:
        if response.status == 206:   # the rest, as asked: "Content-Range: bytes START-END/TOTAL"
            span, _, total = response.headers.get("Content-Range", "").partition(" ")[2].partition("/")
            if span.partition("-")[0] != str(have):
                os.remove(part)
                raise _Incomplete(f"server sent another range than bytes {have}-; starting over")
        else:                        # 200: the whole file (a server that ignores Range): start over
            have, total = 0, response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        show = progress and sys.stderr.isatty()
        start, first = time.monotonic(), have
        try:
            with open(part, "ab") as f:
                f.truncate(have)     # "ab" writes at the end, which is now `have`
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    if show and total:
                        mib, rate = have / 2**20, (have - first) / 2**20 / max(time.monotonic() - start, 1e-3)
                        print(f"\r{os.path.basename(url)}: {100 * have // total:3d}% {mib:.1f}/{total / 2**20:.1f}"
                              f" MiB {rate:.1f} MiB/s", end="", file=sys.stderr, flush=True)
        finally:
            if show and total:
                print(file=sys.stderr)
    # read() does not raise when the connection closes early: only the byte count tells.
    if total is not None and have != total:
        raise _Incomplete(f"connection closed after {have} of {total} bytes")


def download(url, dest, progress=True, retries=3, sleep=time.sleep):
    """Fetch `url` to `dest` (kept if already there), retrying transient failures `retries` times."""
    if os.path.exists(dest):
        return dest   # only ever renamed into place when complete
    part, host = dest + ".part", urllib.parse.urlsplit(url).netloc
    for attempt in range(retries + 1):
        if attempt:
            sleep(2 ** (attempt - 1))   # 1 s, 2 s, 4 s: resets and 5xx tend to be brief
        try:
            _fetch(url, part, progress)
            # Bytes go to .part and the name appears only now, atomically: a file under the final
            # name is always whole, and an interrupted run leaves a .part the next run resumes.
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            e.close()          # it holds the connection
            if e.code < 500 and e.code != 429:   # 404, 403...: asking again will not help
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            reason = f"HTTP {e.code} {e.reason}"
        except urllib.error.URLError as e:   # failed before any response
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            # No name resolution, or refused: an offline machine or a wrong CLVP_HUB_URL. Not retried.
            transient = isinstance(e.reason, (TimeoutError, ConnectionError)) and \
                not isinstance(e.reason, ConnectionRefusedError)
            if not transient or attempt == retries:
                raise DownloadError(f"cannot reach {host}: {reason}; "
                                    "check your network connection or set CLVP_HUB_URL") from None
        except (_Incomplete, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError) as e:
            reason = str(e) or type(e).__name__
    kept = f"; the {os.path.getsize(part)} bytes fetched are kept in {part} and a new run resumes" \
        if os.path.exists(part) else ""
    raise DownloadError(f"{url}: failed {retries + 1} times, last: {reason}{kept}")


def download_official(directory=None, progress=True):
    """Fetch the four official files into `directory` (default: cache_dir()); name -> path."""
    directory = directory or cache_dir()
    os.makedirs(directory, exist_ok=True)
    return {name: download(url, os.path.join(directory, name), progress)
            for name, url in official_urls().items()}


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert official CLVP weights into one clvp.py checkpoint.")
    p.add_argument("--hf", metavar="DIR", required=True, help="a transformers save_pretrained directory")
    p.add_argument("-o", "--output", required=True, help="where to write the checkpoint (e.g. clvp.pt)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage precision of the weights (float16 halves the file)")
    args = p.parse_args(argv)
    try:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise ConversionError(f"{args.output}: directory {out_dir} does not exist")
        config, weights, tokenizer, mel_norms = convert_hf(args.hf)
        clvp.save_checkpoint(args.output, config, weights, tokenizer, mel_norms, dtype=getattr(torch, args.dtype))
    except (ConversionError, clvp.CheckpointError, OSError) as e:
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, "
          f"{sum(v.numel() for v in weights.values()) / 1e6:.1f} M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
