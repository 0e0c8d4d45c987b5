"""convert_weights.py: official CLVP checkpoints -> the single file clvp.py loads.

    python convert_weights.py --tortoise-ar autoregressive.pth --tortoise-clvp clvp2.pth -o clvp.pt
    python convert_weights.py --hf DIR -o clvp.pt [--dtype float16]
    python convert_weights.py --download            # fetch the official files, write ~/.cache/clvp/clvp.pt
    python convert_weights.py --upgrade clvp.pt     # a file an earlier clvp wrote with torch.save, rewritten
    python convert_weights.py --tortoise-hifigan hifidecoder.pth -o hifigan.pt    # speak.py --decoder hifigan

Tortoise's own files: autoregressive.pth (the decoder and its conditioning encoder) and clvp2.pth (the
text and speech encoders), with tokenizer.json and mel_norms.pth (copies ship in data/, the norms as
mel_norms.safetensors).

DIR is what transformers' `ClvpModelForConditionalGeneration.save_pretrained` writes: config.json and
model.safetensors or pytorch_model.bin (sharded or not), plus, when present, the tokenizer's
vocab.json/merges.txt and the feature extractor's preprocessor_config.json (which holds mel_norms).

Every tensor is renamed into clvp.py's layout by a table (hf_weight_map). The only arithmetic is
layout: separate q/k/v projections are stacked into one [q; k; v] matrix, and GPT-2's Conv1D weights,
stored [in, out], are transposed into Linear's [out, in]. Nothing is unpickled: safetensors files are
read by clvp.py's reader and .bin/.pth files with torch.load(weights_only=True), on a torch >= 2.10 only.
What it writes (clvp.pt, speak.pt) is a safetensors file: clvp.py and speak.py never unpickle.
"""
import http.client
import os
import re
import ssl
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import asdict

import torch

import clvp
import speak


class ConversionError(clvp.InputError):
    """Input that cannot be converted; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------------
# Reading tensors: safetensors by clvp's reader; official pickles bounded, and only on a safe torch
# ---------------------------------------------------------------------------------------------------

def read_json(path):
    """A JSON object from a file the user named, or a ConversionError naming the file."""
    return clvp.read_json(path, ConversionError)


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, through clvp's reader: the header checked whole first, then
    each tensor read into its own memory, so the peak is the tensors themselves."""
    return clvp.read_tensor_file(path, lambda tensors: None, ConversionError, view=lambda metadata, tensors: tensors)


# weights_only=True is only safe from torch 2.10: before 2.6 a crafted file runs code (CVE-2025-32434), before
# 2.10 it corrupts memory (CVE-2026-24747). requirements.txt asks for it; a file is never unpickled below it.
SAFE_TORCH = (2, 10)


def load_plain(path, what="cannot be read as plain tensors; files that need to unpickle code are refused"):
    """torch.load of an official pickle, weights_only=True (tensors and plain containers, never code), on a
    torch that is safe, and bounded: torch.save writes a zip archive of stored records, so records that unpack
    to more bytes than the file holds are compressed ones, refused from the zip directory before a byte
    inflates. Only this file unpickles; clvp.py and speak.py read safetensors."""
    version = tuple(int(n) for n in re.match(r"(\d+)\.(\d+)", str(torch.__version__)).groups())
    clvp.require([(version >= SAFE_TORCH, f"{path}: not read: unpickling a crafted file can run code or corrupt "
                   f"memory on torch {torch.__version__} (CVE-2025-32434, CVE-2026-24747); upgrade: "
                   "pip install 'torch>=2.10'")], ConversionError)
    with clvp.open_input(path, ConversionError) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            with zipfile.ZipFile(f) as archive:
                unpacked = sum(record.file_size for record in archive.infolist())
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
            raise ConversionError(f"{path}: {what} (not the zip archive torch.save writes: {clvp.first_line(e)})"
                                  ) from None
        clvp.require([(unpacked <= size, f"{path}: {what} (its records unpack to {unpacked} bytes from a file of "
                       f"{size}; torch.save never compresses them)")], ConversionError)
        f.seek(0)
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"{path}: {what} ({clvp.first_line(e)})") from None


def checked_state(state, path, what="a state dict of tensors"):
    """A state dict as the weight maps index it: names (strings) to dense tensors in memory."""
    clvp.require([(isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) and clvp.plain(v)
                                                   for k, v in state.items()), f"{path}: not {what}")], ConversionError)
    return state


def read_torch(path):
    return checked_state(load_plain(path), path)


def hf_weight_files(directory):
    """The weight files of a save_pretrained directory: an index and the shards it names, or one file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            shards = read_json(index).get("weight_map")
            if not isinstance(shards, dict) or not all(isinstance(s, str) and s == os.path.basename(s) and
                                                       s not in ("", ".", "..") for s in shards.values()):
                raise ConversionError(f"{index}: its weight_map must name shard files of {directory}")
            return [index] + [os.path.join(directory, s) for s in sorted(set(shards.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    raise ConversionError(f"{directory}: no weights found (expected model.safetensors or pytorch_model.bin)")


def hf_inputs(directory):
    """Every file convert_hf may read (for the check that the output is none of them)."""
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: not a directory")
    extra = ("config.json", "vocab.json", "merges.txt", "preprocessor_config.json")
    return [os.path.join(directory, name) for name in extra] + hf_weight_files(directory)


def read_hf_weights(directory):
    """All tensors of a save_pretrained directory, sharded or not."""
    state = {}
    for path in hf_weight_files(directory):
        if not path.endswith(".json"):
            state.update(read_safetensors(path) if path.endswith(".safetensors") else read_torch(path))
    return state


# ---------------------------------------------------------------------------------------------------
# Weight maps: clvp name -> (how, source name(s)), read like a table. The layouts `how` can name:
#   copy      the tensor as it is
#   conv1d    GPT-2's Conv1D weight [in, out] -> Linear [out, in]
#   conv      a 1x1 Conv1d [out, in, 1] -> Linear [out, in]
#   qkv       separate q, k, v projections stacked into one [q; k; v]
#   conv_qkv  the conditioning encoder's fused 1x1 qkv conv, its output channels head by head
#             ([heads, (q, k, v), head_dim]) -> Linear [q; k; v]
# ---------------------------------------------------------------------------------------------------


def per_head_to_stacked(t, heads):
    """[heads * (q, k, v) * head_dim, ...] -> [(q, k, v) * heads * head_dim, ...]: the legacy QKV
    attention splits heads first, then q, k, v; clvp.py splits q, k, v first, then heads."""
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


LAYOUTS = {   # how -> what it does to the source tensor(s)
    "copy": lambda t, heads: t,
    "conv1d": lambda t, heads: t.T,
    "conv": lambda t, heads: t.squeeze(-1),
    "conv_qkv": lambda t, heads: per_head_to_stacked(t.squeeze(-1) if t.dim() == 3 else t, heads),
}


def layout_shapes(how, shape):
    """The shape(s) the source tensor(s) must have to give clvp.py a tensor of `shape`."""
    if how == "conv1d":
        return [shape[::-1]]
    if how == "qkv":
        return [[shape[0] // 3, *shape[1:]]] * 3
    if how in ("conv", "conv_qkv") and len(shape) == 2:
        return [shape + [1]]
    return [shape]


def source_shapes(weight_map, config):
    """{source name: the shape it must have} for every source tensor that a weight map reads."""
    expected, wanted = clvp.expected_shapes(config), {}
    for ours, (how, names) in weight_map.items():
        for name, shape in zip([names] if isinstance(names, str) else names, layout_shapes(how, expected[ours])):
            wanted[name] = shape
    return wanted


def check_source(wanted, state, path, note=""):
    """clvp's one check for missing, unexpected and mis-shaped tensors, on the source file's names."""
    with clvp.prefixed("", ConversionError):
        clvp.check_weights(wanted, state, path, note)


def apply_weight_map(weight_map, state, heads=None):
    """Build clvp's state dict from `state` (already checked) by a weight map; `heads` (the decoder's)
    is for 'conv_qkv'."""
    out = {}
    for ours, (how, names) in weight_map.items():
        if how == "qkv":
            out[ours] = torch.cat([state[n] for n in names], dim=0)
        else:
            out[ours] = LAYOUTS[how](state[names], heads)
    return out


# ---------------------------------------------------------------------------------------------------
# The Hugging Face layout
# ---------------------------------------------------------------------------------------------------


def hf_config(d):
    """transformers' ClvpConfig dict -> clvp.Config. Every number is read through `get`, which checks it
    (an integer, >= 1, or >= 0 for a token id) before anything computes with it; clvp's config check then
    bounds them."""
    def get(part, key):
        e = d.get(part)
        value = e.get(key) if isinstance(e, dict) else None
        low = 0 if key.endswith("token_id") else 1
        clvp.require([(type(value) is int and value >= low,
                       f"{part}.{key} must be an integer >= {low}, not {value!r}")])
        return value

    def encoder(e):
        # The port derives the rotary width from the projection width, with a floor of 32 dims.
        return clvp.EncoderConfig(
            vocab_size=get(e, "vocab_size"), dim=get(e, "hidden_size"), layers=get(e, "num_hidden_layers"),
            heads=get(e, "num_attention_heads"), ff_dim=get(e, "intermediate_size"),
            rotary_dim=max(get(e, "projection_dim") // (get(e, "num_attention_heads") * 2), 32),
            projection_dim=get(e, "projection_dim"))

    dec = "decoder_config"
    return clvp.Config(
        clvp.DecoderConfig(
            dim=get(dec, "hidden_size"), layers=get(dec, "num_hidden_layers"), heads=get(dec, "num_attention_heads"),
            speech_vocab_size=get(dec, "vocab_size"), speech_positions=get(dec, "max_position_embeddings"),
            start_token=get(dec, "bos_token_id"), stop_token=get(dec, "eos_token_id"),
            text_vocab_size=get("text_config", "vocab_size"), text_positions=get(dec, "max_text_tokens"),
            text_start_token=get("text_config", "bos_token_id"), text_stop_token=get("text_config", "eos_token_id"),
            mel_channels=get(dec, "feature_size"), conditioning_blocks=get(dec, "num_mel_attn_blocks")),
        encoder("text_config"), encoder("speech_config"))


def hf_weight_map(config):
    """clvp name -> (how, source names) for a transformers ClvpModelForConditionalGeneration."""
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


def read_hf_tokenizer(directory):
    """transformers' ClvpTokenizer files: vocab.json ({token: id}) and merges.txt ('a b' per line)."""
    vocab, merges_path = read_json(os.path.join(directory, "vocab.json")), os.path.join(directory, "merges.txt")
    clvp.check_input_file(merges_path, ConversionError)
    with open(merges_path, "rb") as f:
        data = f.read(clvp.MAX_JSON_BYTES + 1)
    with clvp.prefixed(f"{directory}: not a readable tokenizer: ", ConversionError):
        clvp.require([(len(data) <= clvp.MAX_JSON_BYTES, f"merges.txt is over {clvp.MAX_JSON_BYTES // 2**20} MiB")])
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise clvp.InputError(f"merges.txt is not UTF-8 ({e.reason} at byte {e.start})") from None
        return clvp.Tokenizer(vocab, [line.split(" ") for line in lines if line and not line.startswith("#version")])


def checked_config(config, path):
    """clvp's own check of a config (sizes in range and consistent) before anything is built from it."""
    with clvp.prefixed(f"{path}: ", ConversionError):
        return clvp.Config.from_dict(asdict(config))


def convert_hf(directory):
    """A save_pretrained directory -> (config, weights, tokenizer or None, mel_norms or None)."""
    if not os.path.isdir(directory):
        raise ConversionError(f"{directory}: not a directory")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{config_path}: missing (is this a transformers CLVP directory?)")
    with clvp.prefixed(f"{config_path}: not a CLVP config: ", ConversionError):
        config = hf_config(read_json(config_path))
    config = checked_config(config, config_path)
    state = {k: v for k, v in read_hf_weights(directory).items() if not k.endswith(HF_IGNORED_SUFFIXES)}
    weight_map = hf_weight_map(config)
    check_source(source_shapes(weight_map, config), state, directory)
    weights = apply_weight_map(weight_map, state)
    tokenizer = read_hf_tokenizer(directory) if os.path.exists(os.path.join(directory, "vocab.json")) else None
    mel_norms = None
    pre = os.path.join(directory, "preprocessor_config.json")
    if os.path.exists(pre):
        mel_norms = read_json(pre).get("mel_norms")
        try:
            mel_norms = None if mel_norms is None else torch.tensor(mel_norms, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:      # torch's own complaint about the list
            raise ConversionError(f"{pre}: mel_norms is not a list of numbers ({clvp.first_line(e)})") from None
    return config, weights, tokenizer, mel_norms


# ---------------------------------------------------------------------------------------------------
# The original Tortoise layout: autoregressive.pth + clvp2.pth
#
#   autoregressive.pth: UnifiedVoice: conditioning_encoder.*, text/mel embeddings and position tables,
#                       gpt.h.N.* (GPT-2 blocks), gpt.ln_f, final_norm, mel_head
#   clvp2.pth:          CLVP: text_emb, speech_emb, {text,speech}_transformer.* (x-transformers encoders),
#                       to_text_latent, to_speech_latent, temperature
# ---------------------------------------------------------------------------------------------------

# Tensors of the original files that clvp.py has no use for.
TORTOISE_SKIPPED = re.compile(r"""
      gpt\.h\.\d+\.attn\.(bias|masked_bias)      # GPT-2 causal-mask buffers that older transformers saved
    | text_head\.(weight|bias)                   # UnifiedVoice's text prediction head: training only
    | (inference_model|gpt_inference)\..+        # the decoder again, as post_init_gpt2_config wraps it
    | gpt\.(wte|wpe)\.weight                     # GPT-2's own tables; wte is mel_embedding once more
    | (text|speech)_transformer\.transformer\.attn_layers\.rotary_pos_emb\.inv_freq   # checked, then recomputed
""", re.X)

AR_FILE, CLVP_FILE = "autoregressive.pth", "clvp2.pth"


def _kind(state):
    """What a state dict looks like: AR_FILE, CLVP_FILE, 'transformers' or None."""
    if any(k.startswith(("gpt.h.", "conditioning_encoder.", "mel_head.")) for k in state):
        return AR_FILE
    if any(k.startswith(("text_transformer.", "speech_transformer.")) for k in state):
        return CLVP_FILE
    if any(k.startswith(("speech_decoder_model.", "text_encoder_model.")) for k in state):
        return "transformers"
    return None


def check_tortoise_file(state, expected, path):
    """One clear error when `path` is not the file it was given as."""
    kind = _kind(state)
    if kind == expected:
        return
    what = {AR_FILE: "autoregressive.pth (the decoder)", CLVP_FILE: "clvp2.pth (the CLVP encoders)"}
    if kind in what:
        raise ConversionError(f"{path}: this is {what[kind]}, given as {what[expected]}; were the two "
                              "files mixed up?")
    if kind == "transformers":
        raise ConversionError(f"{path}: this is a transformers CLVP checkpoint, not Tortoise's {expected}; "
                              "convert its save_pretrained directory with --hf")
    raise ConversionError(f"{path}: not Tortoise's {expected}: none of its {len(state)} tensors has a "
                          f"name of that file (first: {next(iter(state), 'none')})")


def _count(state, prefix):
    """How many numbered children `prefix` has: 'gpt.h.' -> 30."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def shape(state, name, path, dims=2):
    """The shape of state[name], checked (there, with `dims` dimensions) before any of it is indexed."""
    clvp.require([(name in state, f"{path}: tensor {name} is missing")], ConversionError)
    clvp.require([(state[name].dim() == dims, f"{path}: tensor {name} must have {dims} dimensions, not "
                   f"{list(state[name].shape)}")], ConversionError)
    return state[name].shape


def tortoise_config(ar, cl, ar_path=AR_FILE, clvp_path=CLVP_FILE):
    """Sizes read off the tensor shapes of the two state dicts -> clvp.Config.

    The decoder's head count leaves no trace in any shape; it is taken as width // 64 (16 for the
    official 1024, and what UnifiedVoice's docstring recommends). The CLVP encoders' is readable:
    x-transformers' attention is heads x 64 wide."""

    dim = shape(ar, "text_embedding.weight", ar_path)[1]
    speech_vocab = shape(ar, "mel_embedding.weight", ar_path)[0]
    text_vocab = shape(ar, "text_embedding.weight", ar_path)[0]
    if dim % 64:
        raise ConversionError(f"{ar_path}: decoder width {dim} is not a multiple of 64, so its number of "
                              "attention heads (width // 64) cannot be inferred")
    decoder = clvp.DecoderConfig(
        dim=dim, layers=_count(ar, "gpt.h."), heads=dim // 64,
        speech_vocab_size=speech_vocab, speech_positions=shape(ar, "mel_pos_embedding.emb.weight", ar_path)[0],
        start_token=speech_vocab - 2, stop_token=speech_vocab - 1,        # 8192 and 8193: the last two codes
        text_vocab_size=text_vocab, text_positions=shape(ar, "text_pos_embedding.emb.weight", ar_path)[0],
        text_start_token=text_vocab - 1, text_stop_token=0,               # 255 and 0
        mel_channels=shape(ar, "conditioning_encoder.init.weight", ar_path, 3)[1],
        conditioning_blocks=_count(ar, "conditioning_encoder.attn."))

    def encoder(side):
        layers = f"{side}_transformer.transformer.attn_layers."
        vocab, width = shape(cl, f"{side}_emb.weight", clvp_path)
        to_q = shape(cl, layers + "layers.0.1.wrap.to_q.weight", clvp_path)
        if to_q[0] != width or width % 64:
            raise ConversionError(f"{clvp_path}: {side} attention is {to_q[0]} wide (heads x 64) in a "
                                  f"{width}-wide encoder; clvp.py needs the two equal")
        rotary_dim = 2 * shape(cl, layers + "rotary_pos_emb.inv_freq", clvp_path, 1)[0]
        inv_freq = cl[layers + "rotary_pos_emb.inv_freq"]      # compared as precisely as its dtype holds it
        standard = 1 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        if not (inv_freq.is_floating_point() and torch.allclose(
                inv_freq.double(), standard, rtol=max(1e-5, torch.finfo(inv_freq.dtype).eps), atol=0)):
            raise ConversionError(f"{clvp_path}: {layers}rotary_pos_emb.inv_freq is not the standard "
                                  f"rotary table (base 10000 over {rotary_dim} dims)")
        return clvp.EncoderConfig(
            vocab_size=vocab, dim=width, layers=_count(cl, layers + "layers.") // 2,   # attention, feed-forward
            heads=to_q[0] // 64, ff_dim=shape(cl, layers + "layers.1.1.wrap.net.0.proj.weight", clvp_path)[0] // 2,
            rotary_dim=rotary_dim, projection_dim=shape(cl, f"to_{side}_latent.weight", clvp_path)[0])

    config = clvp.Config(decoder, encoder("text"), encoder("speech"))
    if config.speech.vocab_size < decoder.start_token:
        raise ConversionError(f"{clvp_path}: the speech encoder reads {config.speech.vocab_size} codes, but "
                              f"{ar_path}'s decoder writes {decoder.start_token}: not a matching pair")
    return config


def tortoise_weight_map(config):
    """clvp name -> (how, source names) over both files (their names do not overlap)."""
    m = {"logit_scale": ("copy", "temperature")}        # both are used as exp()
    d = config.decoder

    def linear(ours, theirs, how="copy"):
        m[ours + ".weight"] = (how, theirs + ".weight")
        m[ours + ".bias"] = ("conv_qkv" if how == "conv_qkv" else "copy", theirs + ".bias")

    m["conditioning.conv.weight"] = ("copy", "conditioning_encoder.init.weight")     # Conv1d(80, D, 1) in both
    m["conditioning.conv.bias"] = ("copy", "conditioning_encoder.init.bias")
    for i in range(d.conditioning_blocks):
        ours, theirs = f"conditioning.blocks.{i}.", f"conditioning_encoder.attn.{i}."
        linear(ours + "norm", theirs + "norm")
        linear(ours + "qkv", theirs + "qkv", "conv_qkv")
        linear(ours + "out", theirs + "proj_out", "conv")
    m["decoder.text_embedding.weight"] = ("copy", "text_embedding.weight")
    m["decoder.text_positions.weight"] = ("copy", "text_pos_embedding.emb.weight")
    m["decoder.speech_embedding.weight"] = ("copy", "mel_embedding.weight")
    m["decoder.speech_positions.weight"] = ("copy", "mel_pos_embedding.emb.weight")
    for i in range(d.layers):
        ours, theirs = f"decoder.blocks.{i}.", f"gpt.h.{i}."
        linear(ours + "norm1", theirs + "ln_1")
        linear(ours + "qkv", theirs + "attn.c_attn", "conv1d")      # its out axis is already [q; k; v]
        linear(ours + "out", theirs + "attn.c_proj", "conv1d")
        linear(ours + "norm2", theirs + "ln_2")
        linear(ours + "fc", theirs + "mlp.c_fc", "conv1d")
        linear(ours + "proj", theirs + "mlp.c_proj", "conv1d")
    linear("decoder.norm", "gpt.ln_f")
    linear("decoder.final_norm", "final_norm")
    linear("decoder.head", "mel_head")
    for side, c in (("text", config.text), ("speech", config.speech)):
        ours, theirs = f"{side}_encoder.", f"{side}_transformer.transformer."
        m[ours + "embedding.weight"] = ("copy", f"{side}_emb.weight")
        for i in range(c.layers):
            # x-transformers numbers its sublayers: 2i is attention, 2i + 1 the feed-forward; in each,
            # .0.0 is the pre-norm and .1.wrap the block (wrapped by Tortoise's CheckpointedLayer). Its
            # RMSNorm is x / max(|x| / sqrt(dim), 1e-8) * g = x / rms(x) * g: the gain g is our weight as is.
            b = f"{ours}blocks.{i}."
            attn, ff = (f"{theirs}attn_layers.layers.{j}." for j in (2 * i, 2 * i + 1))
            m[b + "norm1.weight"] = ("copy", attn + "0.0.g")
            m[b + "qkv.weight"] = ("qkv", [f"{attn}1.wrap.to_{x}.weight" for x in "qkv"])
            linear(b + "out", attn + "1.wrap.to_out")
            m[b + "norm2.weight"] = ("copy", ff + "0.0.g")
            linear(b + "ff_in", ff + "1.wrap.net.0.proj")                # GLU: [value; gate]
            linear(b + "ff_out", ff + "1.wrap.net.3")
        linear(ours + "norm", theirs + "norm")
        m[ours + "projection.weight"] = ("copy", f"to_{side}_latent.weight")
    return m


def _home(name):
    """Which of the two files a source tensor belongs to."""
    clvp_prefixes = ("text_emb.", "speech_emb.", "text_transformer.", "speech_transformer.", "to_text_latent.",
                     "to_speech_latent.")
    return CLVP_FILE if name == "temperature" or name.startswith(clvp_prefixes) else AR_FILE


def _describe(config):
    d, t, s = config.decoder, config.text, config.speech
    return (f"decoder {d.layers} layers x {d.dim} wide, {d.conditioning_blocks} conditioning blocks; "
            f"text encoder {t.layers} x {t.dim}; speech encoder {s.layers} x {s.dim}")


def convert_tortoise(ar_path, clvp_path):
    """autoregressive.pth + clvp2.pth -> (config, weights, skipped): `skipped` lists the tensors of
    the two files that clvp.py does not use (for --verbose). Every other problem is one ConversionError
    naming the file and the tensors."""
    ar, cl = read_torch(ar_path), read_torch(clvp_path)
    kinds = (_kind(ar), _kind(cl))
    if kinds == (CLVP_FILE, AR_FILE):
        raise ConversionError(f"{ar_path} is clvp2.pth and {clvp_path} is autoregressive.pth: the two files "
                              "were given the other way round")
    check_tortoise_file(ar, AR_FILE, ar_path)
    check_tortoise_file(cl, CLVP_FILE, clvp_path)
    config = checked_config(tortoise_config(ar, cl, ar_path, clvp_path), f"{ar_path} + {clvp_path}")
    weight_map = tortoise_weight_map(config)
    wanted = source_shapes(weight_map, config)
    note = f" for the size read from its other tensors ({_describe(config)}; the official size: " \
           f"{_describe(clvp.Config())})"
    for state, path, kind in ((ar, ar_path, AR_FILE), (cl, clvp_path, CLVP_FILE)):
        used = {n: t for n, t in state.items() if not TORTOISE_SKIPPED.fullmatch(n)}
        check_source({n: shape for n, shape in wanted.items() if _home(n) == kind}, used, path, note)
    skipped = [n for state in (ar, cl) for n in state if TORTOISE_SKIPPED.fullmatch(n)]
    weights = apply_weight_map(weight_map, {**ar, **cl}, heads=config.decoder.heads)
    return config, weights, skipped


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
AUDIO_FILES = {                      # --download --speak: speak.py's two stages, from the same repository
    "diffusion_decoder.pth": HUB_URL,
    "vocoder.pth": HUB_URL,
}
CHUNK = 2**20    # bytes read and written at a time
TIMEOUT = 30     # seconds without a byte before a try counts as failed
STALL = (30, 1024)  # under 1 KiB/s for 30 s ends a download: a trickle never trips TIMEOUT


def official_urls(files=OFFICIAL_FILES):
    base = os.environ.get("CLVP_HUB_URL", "").rstrip("/")
    if base and urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise DownloadError(f"CLVP_HUB_URL={base!r} is not an http:// or https:// URL")
    return {name: f"{base or default}/{name}" for name, default in files.items()}


def not_the_file(path, name):
    """Why the fetched file at `path` cannot be `name` (None if it may be): a .pth must be a torch archive
    (a zip file) and a .json must parse; a server that answers 200 with an HTML page fails both. Read
    through clvp's opener: a FIFO or a directory in the cache is refused, never waited on."""
    with clvp.open_input(path, DownloadError) as f:
        if name.endswith(".pth") and not zipfile.is_zipfile(f):
            return "not a torch archive"
    if name.endswith(".json"):
        try:
            clvp.read_json(path, DownloadError)
        except DownloadError:
            return "not JSON"
    return None


def open_part(part):
    """The .part file, to append to: a regular file of its own, created if missing. Opened without following
    a symbolic link (which could point the write at any file) and without blocking (a FIFO would wait)."""
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        raise DownloadError(f"{part}: cannot be written ({e.strerror}): a link or a FIFO? Delete it and run "
                            "again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DownloadError(f"{part}: not a regular file; delete it and run again")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


class _Incomplete(Exception):
    """A try that ended early; worth another, which resumes from the .part file."""


def _fetch(url, part, progress):
    """One request, appending to `part`. Returns once `part` holds the whole file."""
    have = 0
    if os.path.lexists(part):
        with open_part(part) as f:
            have = os.fstat(f.fileno()).st_size
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
        window = start, have         # the stall check: bytes that arrived since window[0]
        try:
            with open_part(part) as f:
                f.truncate(have)     # "ab" writes at the end, which is now `have`
                while chunk := response.read1(CHUNK):      # read1: what has arrived, so a trickle is seen
                    f.write(chunk)
                    have += len(chunk)
                    seconds = time.monotonic() - window[0]
                    if seconds >= STALL[0]:
                        rate = (have - window[1]) / seconds
                        if rate < STALL[1]:
                            raise DownloadError(f"{url}: stalled at {rate:.0f} bytes/s over {seconds:.0f} s; the {have} "
                                                f"bytes fetched are kept in {part}: run the same command again to resume")
                        window = time.monotonic(), have
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
    if os.path.exists(dest):   # only ever renamed into place when complete, and checked
        problem = not_the_file(dest, dest)
        if problem:
            raise DownloadError(f"{dest}: {problem}, so not a good copy of {os.path.basename(dest)}; delete it "
                                "and run again to fetch it anew")
        return dest
    part, host = dest + ".part", urllib.parse.urlsplit(url).netloc
    for attempt in range(retries + 1):
        if attempt:
            sleep(2 ** (attempt - 1))   # 1 s, 2 s, 4 s: resets and 5xx tend to be brief
        try:
            _fetch(url, part, progress)
            problem = not_the_file(part, dest)
            if problem:
                with clvp.open_input(part, DownloadError) as f:
                    start = f.read(40)
                os.remove(part)
                raise DownloadError(f"{url}: the server sent a file that is {problem} (it starts {start!r}); "
                                    "nothing was kept")
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


def download_official(directory=None, progress=True, files=OFFICIAL_FILES):
    """Fetch the official `files` (default: the four CLVP needs) into `directory` (default: beside
    clvp.default_checkpoint()); name -> path."""
    directory, urls = directory or os.path.dirname(clvp.default_checkpoint()), official_urls(files)
    os.makedirs(directory, exist_ok=True)
    return {name: download(url, os.path.join(directory, name), progress) for name, url in urls.items()}


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def shipped(name):
    """tokenizer.json or mel_norms.safetensors as shipped in data/ (the official files, Apache-2.0)."""
    return os.path.join(clvp.DATA, name)


def read_mel_norms(path):
    """Tortoise's mel_norms.pth (a pickle: what --download fetches) or data/mel_norms.safetensors -> [80]."""
    with clvp.open_input(path, ConversionError) as f:
        pickled = f.read(4) == clvp.OLD_FORMAT
    with clvp.prefixed("", ConversionError):
        if not pickled:
            return clvp.read_mel_norms(path)
        norms = load_plain(path)
        with clvp.prefixed(f"{path}: "):
            clvp.check_mel_norms(norms)
        return norms


def read_tokenizer(path):
    with clvp.prefixed("", ConversionError):                 # the message names the file
        return clvp.Tokenizer.from_file(path)


def fetch_and_convert(directory=None, progress=True):
    """Download the four official files into `directory` (default: the cache) and write clvp.pt there."""
    paths = download_official(directory, progress)
    config, weights, _ = convert_tortoise(paths["autoregressive.pth"], paths["clvp2.pth"])
    out = os.path.join(os.path.dirname(paths["clvp2.pth"]), "clvp.pt")
    clvp.save_checkpoint(out, config, weights, read_tokenizer(paths["tokenizer.json"]),
                         read_mel_norms(paths["mel_norms.pth"]))
    return out


# ---------------------------------------------------------------------------------------------------
# The audio stages' weights (speak.py): Tortoise's diffusion_decoder.pth and vocoder.pth -> speak.pt
# ---------------------------------------------------------------------------------------------------

DIFFUSION_UNUSED = ("code_embedding.", "code_converter.", "mel_head.")    # DiffusionTts tensors only training uses

# The original's names -> speak.py's: where the original numbers the layers of an nn.Sequential, speak.py
# names them (a regular expression on the name, and what replaces the match).
SPEAK_RENAMES = {
    "diffusion": [(r"\.in_layers\.0\.", ".in_norm."), (r"\.in_layers\.2\.", ".in_conv."), (r"\.emb_layers\.1\.", ".emb."),
                  (r"\.out_layers\.0\.", ".out_norm."), (r"\.out_layers\.3\.", ".out_conv."),
                  (r"^contextual_embedder\.0\.", "voice_conv1."), (r"^contextual_embedder\.1\.", "voice_conv2."),
                  (r"^contextual_embedder\.([2-6])\.", lambda m: f"voice_attention.{int(m[1]) - 2}."),
                  (r"^latent_conditioner\.0\.", "latent_conv."),
                  (r"^latent_conditioner\.([1-4])\.", lambda m: f"latent_attention.{int(m[1]) - 1}."),
                  (r"^time_embed\.0\.", "time_fc1."), (r"^time_embed\.2\.", "time_fc2."),
                  (r"^out\.0\.", "out_norm."), (r"^out\.2\.", "out_conv.")],
    "vocoder": [(r"\.input_conv\.0\.", ".input_conv."), (r"\.residual_convs\.(\d)\.1\.", r".residual_convs.\1.0."),
                (r"\.residual_convs\.(\d)\.3\.", r".residual_convs.\1.1."), (r"\.convt_pre\.1\.", ".convt_pre."),
                (r"\.conv_blocks\.(\d)\.1\.", r".conv_blocks.\1."), (r"^conv_post\.1\.", "conv_post.")],
}


def speak_names(group, state, renames=SPEAK_RENAMES):
    """One group of the original's audio weights ("diffusion" or "vocoder") under speak.py's names."""
    renamed = {}
    for name, t in state.items():
        for pattern, new in renames[group]:
            name = re.sub(pattern, new, name)
        renamed[name] = t
    return renamed


def convert_tortoise_audio(diffusion_path, vocoder_path):
    """-> (speak.pt's contents, names skipped). diffusion_decoder.pth is a plain state dict; vocoder.pth holds
    UnivNet's under model_g, with weight norm, which is kept (speak.py folds it when loading). Checked as
    speak.load_speak checks it, before anything is written."""
    diffusion = read_torch(diffusion_path)
    vocoder = load_plain(vocoder_path)
    vocoder = checked_state(vocoder.get("model_g") if isinstance(vocoder, dict) else None, vocoder_path,
                            "Tortoise's vocoder.pth (a state dict of tensors under model_g)")
    skipped = [k for k in diffusion if k.startswith(DIFFUSION_UNUSED)]
    blob = {"format": speak.SPEAK_FORMAT, "version": speak.SPEAK_VERSION, "vocoder": speak_names("vocoder", vocoder),
            "diffusion": speak_names("diffusion", {k: v for k, v in diffusion.items() if not k.startswith(DIFFUSION_UNUSED)})}
    with clvp.prefixed(f"{diffusion_path}, {vocoder_path}: ", ConversionError):
        speak.checked_speak_checkpoint(blob, None)
    return blob, skipped


def fetch_and_convert_audio(directory=None, progress=True):
    """Download diffusion_decoder.pth and vocoder.pth into `directory` (default: the cache) and write speak.pt
    there, beside clvp.pt, where speak.py looks for it."""
    paths = download_official(directory, progress, AUDIO_FILES)
    out = os.path.join(os.path.dirname(paths["vocoder.pth"]), "speak.pt")
    blob, _ = convert_tortoise_audio(paths["diffusion_decoder.pth"], paths["vocoder.pth"])
    clvp.write_tensor_file(out, blob)
    return out


# ---------------------------------------------------------------------------------------------------
# The fast path's HiFi-GAN (speak.py --decoder hifigan): tortoise 3.0's hifidecoder.pth -> hifigan.pt
# ---------------------------------------------------------------------------------------------------

FAST_URL = "https://huggingface.co/Manmay/tortoise-tts/resolve/main"     # where api_fast.py gets it
FAST_FILES = {"hifidecoder.pth": FAST_URL}


def convert_tortoise_hifigan(path):
    """hifidecoder.pth (HifiganGenerator's state dict, with weight norm) -> (hifigan.pt's contents, names
    skipped). The weight norm is folded here, once (w = g * v / |v|), so speak.py reads plain convolutions.
    api_fast.py loads the file with strict=False: a tensor HifiGan has no place for is skipped (listed with
    --verbose), as there; a missing one is refused, where the original would keep its random initialisation."""
    with clvp.prefixed(f"{path}: ", ConversionError):
        state = speak.fold_weight_norm(read_torch(path), "hifigan")
        with torch.device("meta"):
            names = set(speak.HifiGan(*speak.hifigan_sizes(state)).state_dict())
        blob = {"format": speak.HIFIGAN_FORMAT, "version": speak.HIFIGAN_VERSION,
                "hifigan": {k: v for k, v in state.items() if k in names}}
        speak.checked_hifigan_checkpoint(blob, None)
    return blob, sorted(k for k in state if k not in names)


def fetch_and_convert_hifigan(directory=None, progress=True):
    """Download hifidecoder.pth into `directory` (default: the cache) and write hifigan.pt there, beside clvp.pt,
    where speak.py --decoder hifigan looks for it."""
    paths = download_official(directory, progress, FAST_FILES)
    out = os.path.join(os.path.dirname(paths["hifidecoder.pth"]), "hifigan.pt")
    clvp.write_tensor_file(out, convert_tortoise_hifigan(paths["hifidecoder.pth"])[0])
    return out


def build_parser():
    p = clvp.ArgumentParser(prog="convert_weights.py", description="Convert official CLVP weights into the one "
                            "file clvp.py loads. Give one source: --hf, --tortoise-ar with --tortoise-clvp, or "
                            "--download.")
    p.add_argument("--hf", metavar="DIR", help="a transformers save_pretrained directory")
    p.add_argument("--tortoise-ar", metavar="PATH", help="Tortoise's autoregressive.pth")
    p.add_argument("--tortoise-clvp", metavar="PATH", help="Tortoise's clvp2.pth")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json for --tortoise-* (default: data/tokenizer.json)")
    p.add_argument("--mel-norms", metavar="PATH", help="Tortoise's mel_norms.pth for --tortoise-* (default: "
                   "data/mel_norms.safetensors, the same numbers)")
    p.add_argument("--tortoise-diffusion", metavar="PATH", help="Tortoise's diffusion_decoder.pth (with "
                   "--tortoise-vocoder: writes speak.py's speak.pt)")
    p.add_argument("--tortoise-vocoder", metavar="PATH", help="Tortoise's vocoder.pth")
    p.add_argument("--tortoise-hifigan", metavar="PATH", help="tortoise 3.0's hifidecoder.pth (with -o: writes "
                   "speak.py --decoder hifigan's hifigan.pt)")
    p.add_argument("--download", action="store_true", help="fetch the official Tortoise files and convert them")
    p.add_argument("--speak", action="store_true", help="with --download: also fetch diffusion_decoder.pth and "
                   "vocoder.pth and write speak.py's speak.pt beside clvp.pt")
    p.add_argument("--fast", action="store_true", help="with --download: also fetch hifidecoder.pth (from "
                   "Manmay/tortoise-tts, as api_fast.py does) and write hifigan.pt beside clvp.pt")
    p.add_argument("--cache", metavar="DIR", help="where --download keeps the files (default: $CLVP_CACHE or "
                   "~/.cache/clvp); clvp.pt is written there")
    p.add_argument("-o", "--output", help="where to write the checkpoint (e.g. clvp.pt)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage precision of the weights (float16 halves the file)")
    p.add_argument("--verbose", action="store_true", help="list the source tensors that clvp.py does not use")
    p.add_argument("--upgrade", metavar="PATH", help="rewrite a clvp.pt or speak.pt that an earlier clvp saved "
                   "with torch.save in today's format, in place")
    return p


def convert(args):
    """The conversion the arguments ask for, every input and the output checked before any work."""
    clvp.require([(args.download or not args.speak, "--speak only applies with --download"),
                  (args.download or not args.fast, "--fast only applies with --download")], ConversionError)
    if args.upgrade:
        return upgrade(args)
    if args.download:
        print(f"wrote {fetch_and_convert(args.cache, progress=True)}")
        if args.speak:
            print(f"wrote {fetch_and_convert_audio(args.cache, progress=True)}")
        if args.fast:
            print(f"wrote {fetch_and_convert_hifigan(args.cache, progress=True)}")
        return 0
    if args.tortoise_hifigan:
        return convert_hifigan(args)
    if args.tortoise_diffusion or args.tortoise_vocoder:
        return convert_audio(args)
    if bool(args.hf) == bool(args.tortoise_ar or args.tortoise_clvp):
        raise ConversionError("give one source: --hf DIR, or --tortoise-ar with --tortoise-clvp, or --download")
    if not args.output:
        raise ConversionError("say where to write the checkpoint with -o PATH")
    if not args.hf and not (args.tortoise_ar and args.tortoise_clvp):
        raise ConversionError("the Tortoise layout needs both --tortoise-ar and --tortoise-clvp")
    tokenizer_path, norms_path = args.tokenizer or shipped("tokenizer.json"), args.mel_norms or shipped("mel_norms.safetensors")
    inputs = hf_inputs(args.hf) if args.hf else [args.tortoise_ar, args.tortoise_clvp, tokenizer_path, norms_path]
    with clvp.prefixed("-o ", ConversionError):
        clvp.check_output(args.output, inputs)
    skipped = []
    if args.hf:
        config, weights, tokenizer, mel_norms = convert_hf(args.hf)
    else:
        config, weights, skipped = convert_tortoise(args.tortoise_ar, args.tortoise_clvp)
        tokenizer, mel_norms = read_tokenizer(tokenizer_path), read_mel_norms(norms_path)
    clvp.save_checkpoint(args.output, config, weights, tokenizer, mel_norms, dtype=getattr(torch, args.dtype))
    for name in skipped if args.verbose else []:
        print(f"skipped {name}")
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, "
          f"{sum(v.numel() for v in weights.values()) / 1e6:.1f} M parameters)")
    return 0


def convert_audio(args):
    """--tortoise-diffusion and --tortoise-vocoder -> speak.pt."""
    clvp.require([(not (args.hf or args.tortoise_ar or args.tortoise_clvp or args.download),
                   "convert the audio files on their own: --tortoise-diffusion and --tortoise-vocoder with -o"),
                  (bool(args.tortoise_diffusion and args.tortoise_vocoder),
                   "the audio stages need both --tortoise-diffusion and --tortoise-vocoder"),
                  (bool(args.output), "say where to write the checkpoint with -o PATH (e.g. speak.pt)")], ConversionError)
    with clvp.prefixed("-o ", ConversionError):
        clvp.check_output(args.output, [args.tortoise_diffusion, args.tortoise_vocoder])
    blob, skipped = convert_tortoise_audio(args.tortoise_diffusion, args.tortoise_vocoder)
    for part in ("diffusion", "vocoder"):                 # --dtype: the storage precision, as for clvp.pt
        blob[part] = {k: v.to(getattr(torch, args.dtype)) if v.is_floating_point() else v for k, v in blob[part].items()}
    with clvp.prefixed(f"{args.output}: not written in {args.dtype}: ", ConversionError):
        speak.checked_speak_checkpoint(blob, None)
    clvp.write_tensor_file(args.output, blob)
    for name in skipped if args.verbose else []:
        print(f"skipped {name}")
    n = sum(v.numel() for part in ("diffusion", "vocoder") for v in blob[part].values())
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, {n / 1e6:.1f} M parameters; "
          f"{len(skipped)} training-only tensors skipped)")
    return 0


def convert_hifigan(args):
    """--tortoise-hifigan -> hifigan.pt."""
    clvp.require([(not (args.hf or args.tortoise_ar or args.tortoise_clvp or args.tortoise_diffusion or
                        args.tortoise_vocoder), "convert hifidecoder.pth on its own: --tortoise-hifigan PATH -o PATH"),
                  (bool(args.output), "say where to write the checkpoint with -o PATH (e.g. hifigan.pt)")], ConversionError)
    with clvp.prefixed("-o ", ConversionError):
        clvp.check_output(args.output, [args.tortoise_hifigan])
    blob, skipped = convert_tortoise_hifigan(args.tortoise_hifigan)
    blob["hifigan"] = {k: v.to(getattr(torch, args.dtype)) for k, v in blob["hifigan"].items()}   # --dtype: storage
    with clvp.prefixed(f"{args.output}: not written in {args.dtype}: ", ConversionError):
        speak.checked_hifigan_checkpoint(blob, None)
    clvp.write_tensor_file(args.output, blob)
    for name in skipped if args.verbose else []:
        print(f"skipped {name}")
    n = sum(v.numel() for v in blob["hifigan"].values())
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, {n / 1e6:.1f} M parameters; "
          f"{len(skipped)} tensors skipped, as api_fast.py's strict=False skips them)")
    return 0


def old_speak_file(path):
    """A speak.pt of format version 2 (a tensor file with the original's names) -> its contents; None for a
    zip archive (version 1), which load_plain reads; anything else is refused from its header."""
    with clvp.open_input(path, ConversionError) as f:
        if f.read(4) == clvp.OLD_FORMAT:
            return None
    return clvp.read_tensor_file(path, lambda blob: clvp.require([(
        blob.get("format") == speak.SPEAK_FORMAT and blob.get("version") == 2, "not the zip archive torch.save writes "
        "(format version 1), nor a speak.pt of version 2: nothing to upgrade")]), ConversionError)


def upgrade(args):
    """--upgrade PATH: a clvp.pt or speak.pt of format version 1 (a torch.save pickle, read once here on a safe
    torch), or a speak.pt of version 2 (the original's nn.Sequential names) -> the same numbers in the current
    format, checked as clvp.py and speak.py check them, replacing the old file only once the new one is whole."""
    path = args.upgrade
    clvp.require([(not any(getattr(args, k) for k in ("hf", "tortoise_ar", "tortoise_clvp", "tortoise_diffusion",
                                                       "tortoise_vocoder", "tortoise_hifigan", "download", "output")),
                   "--upgrade PATH rewrites PATH in place; give it alone")], ConversionError)
    with clvp.prefixed("--upgrade ", ConversionError):
        clvp.check_output(path)
    old = old_speak_file(path) or load_plain(path, "not a clvp.pt or speak.pt of the old format")
    kind = old.get("format") if isinstance(old, dict) and old.get("version") in (1, 2) else None
    clvp.require([(kind in ("clvp", "speak") and (kind, old.get("version")) != ("clvp", 2),
                   f"{path}: not a clvp.pt or speak.pt of format version 1, or a speak.pt of version 2")],
                 ConversionError)
    groups = {"clvp": ("weights",), "speak": ("diffusion", "vocoder")}[kind]
    others = ("config", "tokenizer", "mel_norms") if kind == "clvp" else ()
    blob = {k: checked_state(v, path, f"a {kind} file: {k} must be a group of tensors") if k in groups else v
            for k, v in old.items() if k in groups + others and v is not None}
    blob["format"] = kind
    with clvp.prefixed(f"{path}: ", ConversionError):
        if kind == "clvp":
            blob["version"] = clvp.FORMAT_VERSION
            clvp.checked_checkpoint(blob)
        else:
            blob.update(version=speak.SPEAK_VERSION, **{g: speak_names(g, blob[g]) for g in groups})
            speak.checked_speak_checkpoint(blob, None)
    clvp.write_tensor_file(path, blob)
    print(f"rewrote {path} as format version {blob['version']} (safetensors)")
    return 0


def main(argv=None):
    return clvp.run_command("convert_weights.py", lambda: convert(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
