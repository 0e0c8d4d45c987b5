"""Tests for clvp.py and convert_weights.py.

Parity tests build transformers' CLVP (the version pinned in requirements-dev.txt) with random weights,
save it with save_pretrained, convert it with convert_weights.py, load it with clvp.load_model and
compare numbers. Tolerances are absolute, in fp32 on the CPU.
"""
import os
import subprocess
import sys

import pytest
import torch

import clvp
import convert_weights

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4


# ---------------------------------------------------------------------------------------------------
# Reference models (transformers) with random weights, converted once per session
# ---------------------------------------------------------------------------------------------------

TINY_HF = dict(
    text_config=dict(hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2,
                     num_attention_heads=2),
    speech_config=dict(vocab_size=8192, hidden_size=64, intermediate_size=128, projection_dim=64,
                       num_hidden_layers=2, num_attention_heads=2),
    decoder_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_mel_attn_blocks=2),
    projection_dim=64)
OFFICIAL_HF = dict(speech_config=dict(vocab_size=8192))   # the port's defaults are the official sizes


def make_reference(hf_kwargs, seed):
    """A transformers CLVP with every parameter randomized (zero-initialised ones included)."""
    from transformers import ClvpConfig, ClvpModelForConditionalGeneration
    torch.manual_seed(seed)
    ref = ClvpModelForConditionalGeneration(ClvpConfig(**hf_kwargs)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        # A random decoder may emit the start token, which the speech encoder cannot embed; forbid it.
        ref.speech_decoder_model.lm_head.bias[8192] = -1e4
    return ref


def converted(ref, directory):
    ref.save_pretrained(directory)
    out = os.path.join(directory, "clvp.pt")
    assert convert_weights.main(["--hf", str(directory), "-o", out]) == 0
    return clvp.load_model(out, "cpu")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    ref = make_reference(TINY_HF, seed=0)
    return ref, converted(ref, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def official_pair(tmp_path_factory):
    ref = make_reference(OFFICIAL_HF, seed=1)
    return ref, converted(ref, tmp_path_factory.mktemp("official"))


def reference_greedy(ref, mels, text_ids, steps):
    """transformers' greedy generate, as ClvpModelForConditionalGeneration.generate runs it, with the
    per-step logits: the prompt text is ids + [0] (the conditioning encoder adds [255] and another [0])."""
    text = torch.nn.functional.pad(text_ids, (0, 1), value=0)
    cond = ref.conditioning_encoder(input_features=mels, input_ids=text)
    out = ref.speech_decoder_model.generate(conditioning_embeds=cond, do_sample=False, max_new_tokens=steps,
                                            min_new_tokens=steps, output_logits=True,
                                            return_dict_in_generate=True, pad_token_id=8193)
    return out.sequences[:, 1:], torch.stack(out.logits, dim=1)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Model parity
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", ["tiny_pair", "official_pair"])
def test_model_parity(pair, request):
    ref, model = request.getfixturevalue(pair)
    torch.manual_seed(2)
    mels = torch.randn(2, 80, 150)
    text = torch.randint(1, 250, (2, 17))
    speech = torch.randint(0, 8192, (3, 40))
    with torch.inference_mode():
        lat_ref = ref.conditioning_encoder(input_features=mels, input_ids=text)[:, 0]
        assert maxdiff(model.conditioning_latent(mels), lat_ref) <= TOL

        text_plus_stop = torch.nn.functional.pad(text, (0, 1), value=0)
        assert maxdiff(model.text_features(text), ref.get_text_features(input_ids=text_plus_stop)) <= TOL
        assert maxdiff(model.speech_features(speech), ref.speech_encoder_model(input_ids=speech)[0]) <= TOL

        ref_sim = ref(input_ids=text_plus_stop[:1].expand(3, -1), input_features=mels[:1].expand(3, -1, -1))
        # The port's forward scores its own argmax tokens; score our tokens with its encoders instead.
        t = ref.get_text_features(input_ids=text_plus_stop)
        s = ref.speech_encoder_model(input_ids=speech)[0]
        t, s = t / t.norm(dim=-1, keepdim=True), s / s.norm(dim=-1, keepdim=True)
        expected = ref.logit_scale.exp() * t @ s.T
        assert maxdiff(model.similarity(text, speech), expected) <= TOL
        assert ref_sim.logits_per_text.shape == (3, 3)


@pytest.mark.parametrize("pair, steps", [("tiny_pair", 30), ("official_pair", 8)])
def test_decoder_logits_match_reference_generate(pair, steps, request):
    ref, model = request.getfixturevalue(pair)
    torch.manual_seed(3)
    mels = torch.randn(1, 80, 120)
    text = torch.randint(1, 250, (1, 11))
    with torch.inference_mode():
        tokens, ref_logits = reference_greedy(ref, mels, text, steps)
        logits = model.speech_logits(mels, text, tokens)     # [1, steps + 1, 8194]
    keep = [i for i in range(8194) if i != 8192]             # the -1e4 column rounds at 1e-3
    assert maxdiff(logits[:, :steps, keep], ref_logits[:, :, keep]) <= TOL
    assert torch.equal(logits[:, :steps].argmax(-1), tokens)


def test_kv_cached_logits_equal_uncached(tiny_pair):
    _, model = tiny_pair
    torch.manual_seed(4)
    mels = torch.randn(1, 80, 100)
    text = torch.randint(1, 250, (1, 9))
    speech = torch.randint(0, 8192, (1, 25))
    dec = model.decoder
    with torch.inference_mode():
        full = model.speech_logits(mels, text, speech)
        prompt = dec.prompt(model.voice_latent(mels)[None], text)
        cache = clvp.KVCache(dec.config, 1, prompt.shape[1] + speech.shape[1], "cpu", torch.float32)
        steps = [dec.logits(dec(prompt, cache)[:, -1:])]
        for k in range(speech.shape[1]):
            x = dec.embed_speech(speech[:, k:k + 1], clvp.speech_position(k + 1))
            steps.append(dec.logits(dec(x, cache, start=prompt.shape[1] + k)))
    assert maxdiff(torch.cat(steps, dim=1), full) <= 1e-5


def test_contrastive_loss_matches_definition_and_trains(tiny_pair):
    _, trained = tiny_pair
    model = clvp.CLVP(trained.config)
    model.load_state_dict(trained.state_dict())
    torch.manual_seed(5)
    text = torch.randint(1, 250, (4, 10))
    speech = torch.randint(0, 8192, (4, 30))
    loss = model.contrastive_loss(text, speech)
    sim = model.similarity(text, speech)
    labels = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(sim, labels) + torch.nn.functional.cross_entropy(sim.T, labels)) / 2
    assert abs(loss.item() - expected.item()) <= 1e-6
    loss.backward()
    for name, p in list(model.text_encoder.named_parameters()) + list(model.speech_encoder.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    encoders = list(model.text_encoder.parameters()) + list(model.speech_encoder.parameters()) + [model.logit_scale]
    opt = torch.optim.SGD(encoders, lr=0.05)
    opt.step()
    assert model.contrastive_loss(text, speech).item() < loss.item()


# ---------------------------------------------------------------------------------------------------
# Checkpoints and conversion: bad input
# ---------------------------------------------------------------------------------------------------


def run_convert(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "convert_weights.py"), *args],
                          capture_output=True, text=True)


def assert_clean_error(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, tiny_pair):
    ref, _ = tiny_pair
    d = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(d)
    return d


def test_convert_writes_loadable_checkpoint_and_halves_in_fp16(tiny_hf_dir, tmp_path):
    full, half = tmp_path / "a.pt", tmp_path / "b.pt"
    assert run_convert("--hf", str(tiny_hf_dir), "-o", str(full)).returncode == 0
    assert run_convert("--hf", str(tiny_hf_dir), "-o", str(half), "--dtype", "float16").returncode == 0
    assert 0.4 < half.stat().st_size / full.stat().st_size < 0.6
    a, b = clvp.load_model(full, "cpu"), clvp.load_model(half, "cpu")
    assert b.decoder.head.weight.dtype == torch.float32
    assert maxdiff(a.decoder.head.weight, b.decoder.head.weight) < 1e-3


def test_convert_sharded_and_bin(tiny_pair, tmp_path):
    ref, model = tiny_pair
    for kwargs in (dict(max_shard_size="200KB"), dict(safe_serialization=False)):
        d = tmp_path / str(len(kwargs) + len(str(kwargs)))
        ref.save_pretrained(d, **kwargs)
        assert run_convert("--hf", str(d), "-o", str(d / "c.pt")).returncode == 0
        loaded = clvp.load_model(d / "c.pt", "cpu")
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_convert_bad_inputs(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    out = tmp_path / "out.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    assert_clean_error(run_convert("--hf", str(empty), "-o", str(out)), "no weights found")
    assert_clean_error(run_convert("--hf", str(tmp_path / "nope"), "-o", str(out)), "not a directory")

    state = load_file(tiny_hf_dir / "model.safetensors")
    for name, change in (("removed", lambda s: s.pop("speech_decoder_model.lm_head.bias")),
                         ("reshaped", lambda s: s.update({"logit_scale": torch.zeros(2)}))):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
        broken = dict(state)
        change(broken)
        save_file(broken, d / "model.safetensors")
        word = "lm_head.bias" if name == "removed" else "logit_scale"
        assert_clean_error(run_convert("--hf", str(d), "-o", str(out)), word)
    d = tmp_path / "truncated"
    d.mkdir()
    (d / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    (d / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes()[:5000])
    assert_clean_error(run_convert("--hf", str(d), "-o", str(out)), "model.safetensors")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".clvp-")]


def test_load_model_bad_files(tiny_hf_dir, tmp_path):
    good = tmp_path / "good.pt"
    assert run_convert("--hf", str(tiny_hf_dir), "-o", str(good)).returncode == 0
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:10000])
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    other = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(1)}, other)
    blob = torch.load(good, weights_only=True)
    del blob["weights"]["decoder.head.bias"]
    blob["weights"]["logit_scale"] = torch.zeros(3)
    broken = tmp_path / "broken.pt"
    torch.save(blob, broken)
    cases = [(truncated, "not a readable"), (text, "not a readable"), (other, "not a clvp checkpoint"),
             (tmp_path / "missing.pt", "no such file"), (tmp_path, "directory")]
    for path, words in cases:
        with pytest.raises(clvp.CheckpointError, match=words):
            clvp.load_model(path, "cpu")
    with pytest.raises(clvp.CheckpointError) as e:
        clvp.load_model(broken, "cpu")
    assert "missing decoder.head.bias" in str(e.value) and "logit_scale has shape [3]" in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Generation and reranking
# ---------------------------------------------------------------------------------------------------

STOP_BIAS = 0.395   # with seed 3 below, the reference's greedy candidate stops at step 11 of 30


@pytest.mark.parametrize("stop_bias", [0.0, STOP_BIAS])
@pytest.mark.parametrize("pad_to_max", [True, False])
def test_greedy_generate_matches_reference(tiny_pair, stop_bias, pad_to_max):
    import copy
    ref, model = (copy.deepcopy(m) for m in tiny_pair)
    with torch.no_grad():
        ref.speech_decoder_model.lm_head.bias[8193] += stop_bias
        model.decoder.head.bias[8193] += stop_bias
    torch.manual_seed(3)
    mels = torch.randn(1, 80, 120)
    text = torch.randint(1, 250, (1, 11))
    steps = 30
    with torch.inference_mode():
        out = ref.generate(input_ids=text, input_features=mels, do_sample=False, max_new_tokens=steps,
                           repetition_penalty=2.0, return_dict_in_generate=True, pad_token_id=8193, eos_token_id=8193,
                           pad_to_max_mel_tokens=steps + 1 if pad_to_max else None)
    gen = model.generate(text, mels, num_candidates=1, max_new_tokens=steps, temperature=0,
                         repetition_penalty=2.0, pad_to_max=pad_to_max)
    stopped_at = int(gen.lengths[0])
    if stop_bias:
        assert 1 <= stopped_at <= steps - 4                  # the case this test is about: a midway stop
        assert gen.candidates[0, stopped_at:-3].eq(83).all()
    else:
        assert stopped_at == steps
    assert torch.equal(gen.candidates, out.speech_ids)
    assert maxdiff(gen.scores, out.logits_per_text[0]) <= TOL


def test_generate_batches_and_seed(tiny_pair):
    _, model = tiny_pair
    torch.manual_seed(6)
    mels = torch.randn(2, 80, 90)
    text = torch.randint(1, 250, (8,))
    run = lambda seed, bs: model.generate(text, mels, num_candidates=5, batch_size=bs, max_new_tokens=20,
                                          seed=seed, top_k=2)
    a, b, c = run(7, 2), run(7, 2), run(8, 2)
    assert torch.equal(a.candidates, b.candidates) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.candidates, c.candidates)
    assert a.candidates.shape == (5, 20) and a.scores.shape == (5,) and a.best.shape == (2, 20)
    assert torch.equal(a.best, a.candidates[a.order[:2]])
    assert a.scores[a.order].diff().le(0).all()
    # Scores are CLVP's similarity of the text with each fixed candidate, whatever the batching.
    with torch.inference_mode():
        assert maxdiff(model.similarity(text[None], a.candidates)[0], a.scores) <= 1e-5
    # Greedy candidates are identical however they are batched, and the prompt is averaged over clips.
    g1 = model.generate(text, mels, num_candidates=3, batch_size=1, max_new_tokens=12, temperature=0)
    g3 = model.generate(text, mels, num_candidates=3, batch_size=3, max_new_tokens=12, temperature=0)
    assert torch.equal(g1.candidates, g3.candidates)
    with torch.inference_mode():
        first = model.speech_logits(mels, text[None], g1.candidates[:1, :0])[0, 0]
    assert g1.candidates[0, 0] == first.argmax()


def test_fix_candidates_like_tortoise():
    tokens = torch.tensor([[5, 6, 7, 8193, 9, 8193, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    fixed, lengths = clvp.fix_candidates(tokens, 8193)
    assert fixed.tolist() == [[5, 6, 7, 83, 83, 45, 45, 248], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert lengths.tolist() == [3, 8]
    padded, _ = clvp.fix_candidates(tokens[1:], 8193, pad_to=10)
    assert padded.tolist() == [[1, 2, 3, 4, 5, 6, 7, 45, 45, 248]]


def test_processors_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper, TypicalLogitsWarper
    torch.manual_seed(9)
    logits = torch.randn(4, 8194) * 3
    ids = torch.randint(0, 8194, (4, 12))
    seen = torch.zeros(4, 8194, dtype=torch.bool).scatter(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(2.0)(ids, logits.clone())
    assert torch.equal(clvp.repetition_penalty(logits, seen, 2.0), expected)
    for p in (0.1, 0.8, 0.95):
        assert torch.equal(clvp.top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))
    for mass in (0.2, 0.9):
        assert torch.equal(clvp.typical_filter(logits, mass), TypicalLogitsWarper(mass)(ids, logits.clone()))
