"""Tests for clvp.py, in the order of its sections: text, audio, networks, the CLVP model, generation
and reranking, loading, command line.

Parity tests compare with transformers' CLVP (the version pinned in requirements-dev.txt) and with the
original Tortoise text and audio code, on random weights and the tortoise-tts 3.0.0 source package's
data (see conftest.py). Tolerances are absolute, in fp32 on the CPU. The original Tortoise networks are
compared in test_tortoise.py; conversion and download in test_convert_weights.py; bench.py in test_bench.py.
"""
import ast
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import soundfile
import torch

import transformers
from transformers import ClvpFeatureExtractor
from transformers.audio_utils import mel_filter_bank

import clvp
from clvp import (CONDITIONING_SAMPLES, HOP, MIN_SAMPLES, N_FFT, N_MELS, SAMPLE_RATE, AudioError, Tokenizer,
                  bpe, clean_text, format_conditioning, load_audio, log_mel_spectrogram, mel_filterbank, merge,
                  number_to_words, to_ascii)
from conftest import FULL, maxdiff

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4
BF16_MAX, BF16_MEAN, BF16_RANK = 0.5, 0.05, 0.95  # measured: 0.067, 0.0117, 0.997 (logits spread ~110)
VOICE = os.path.join(HERE, "examples", "voice.wav")


# ---------------------------------------------------------------------------------------------------
# Text: English cleaners and the BPE tokenizer, against Tortoise's own tokenizer.py
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope='session')
def original(tortoise_src):
    """Tortoise's tortoise/utils/tokenizer.py, imported by path."""
    spec = importlib.util.spec_from_file_location(
        'tortoise_tokenizer', tortoise_src / 'tortoise' / 'utils' / 'tokenizer.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def original_tokenizer(original, tokenizer_json):
    return original.VoiceBpeTokenizer(vocab_file=str(tokenizer_json))


@pytest.fixture(scope='session')
def tokenizer(tokenizer_json):
    return Tokenizer.from_file(tokenizer_json)


@pytest.fixture(scope='session')
def shipped_texts(tortoise_src):
    """{name: text} of tortoise/data/*.txt."""
    paths = sorted((tortoise_src / 'tortoise' / 'data').glob('*.txt'))
    return {p.name: p.read_text(encoding='utf-8') for p in paths}


# ------------------------------------------------------------------------------------------------
# Sentences
# ------------------------------------------------------------------------------------------------
NUMBERS = [0, 7, 13, 20, 21, 99, 100, 101, 110, 999, 1000, 1001, 1010, 1100, 1900, 1905, 1999, 2000,
           2001, 2005, 2009, 2010, 2019, 2100, 2999, 3000, 3001, 10000, 10001, 100000, 123456,
           1000000, 1000001, 1000020, 1000100, 1234567890, 10 ** 12, 10 ** 15 + 7, 10 ** 21 + 100,
           int('9' * 36), 10 ** 35]

HANDWRITTEN = [
    # numbers in context, leading zeros, digits glued to words
    'It happened in 1066, not in 1492.', 'Call 007 now.', 'Room 0 and room 00.', 'He is 42 years old.',
    'Highway 101 runs north.', 'The 1990s were loud.', 'Windows 95 and Windows 2000.', 'mp3 files',
    'Agent 47 and COVID-19.', 'Catch-22 is a book.', 'Page 3 of 12.', 'In 2024 or 2025?',
    # money
    'It costs $12.50 today.', 'Only $1.', 'A bargain at $0.01!', 'That is $1.01 exactly.', 'About $.5 each.',
    'It cost £3.', 'We paid £1,000 for it.', 'A cool $1,000,000.', 'Nothing: $0.', 'Still nothing: $0.00.',
    'Odd price $1.2.3 here.', 'It was $5. Then $6.', 'Twenty $20 bills.', 'It costs €20.', 'It costs ¥100.',
    'Only 5¢.', '$100,000.99 in total', 'A $1 bill and a $2 bill.', 'Pay $12.5 or $12.05.',
    # ordinals
    'The 1st, 2nd and 3rd place.', 'The 4th of July.', 'His 11th, 12th and 13th tries.',
    'The 21st century.', 'The 101st Airborne.', 'The 1000th visitor.', 'The 22nd and 23rd.',
    'The 100th and 111th.', 'The 1,000,001st time.', 'The 0th element.', 'The 21th of June.',
    'The 1ST and 2ND.', 'He came 1stop 4the win.', 'The 1900th year.', 'My 90th birthday.',
    # decimals and comma numbers
    'Pi is 3.14.', 'Half is 0.5.', 'It was 10.05 seconds.', 'Version 2.5.6 is out.', '1.000 exactly',
    'We sold 1,000 copies.', 'There are 12,345,678 people.', 'Count 1,2,3 go.', 'It was 1,000.50 total.',
    'Numbers like 1, 2, and 3.', 'See 1,2 and 3,4,5.', '1,234th place',
    # abbreviations, case variants
    'Mr. Smith met Mrs. Smith.', 'Dr. Who and Drs. Jekyll.', 'St. Louis and St. Paul.',
    'Acme Co. and Acme Ltd.', 'Martin Luther King Jr. spoke.', 'Maj. Gen. Lee arrived.',
    'Rev. Lt. Hon. Sgt. Capt. Esq. Col. Ft. all here.', 'MR. BIG and MRS. BIG.', 'mR. mixed case.',
    'Dr.Who without a space.', 'mr.st. together', 'Main st. is closed.', 'Ft. Worth, Texas.',
    'He is the Hon. member.', 'Capt. Kirk and Lt. Uhura.', 'Sgt. Pepper.', 'John Smith, Esq.',
    'Col. Mustard.', 'Mrs.Mr.Dr.', 'The mrs and the mr without dots.', 'Gen. 1st Lt. Rev. 2nd',
    # punctuation and quotes
    'Wait... what?!', 'A (parenthetical) remark; then a colon: done.', 'and/or', 'well-known',
    "'single quotes'", 'He said "hi" to me.', 'a " b', '"Quoted." "Twice."', 'tabs\tand\nnewlines',
    '  leading and trailing  ', 'multiple     spaces', 'Hashtag #one @user & co', '100% sure',
    'x*y=z', '~tilde~', '[brackets] {braces} <angle>', 'back\\slash', 'pipe|char', '`backtick`',
    "don't", "I'm", "rock 'n' roll", '_underscore_', 'a_b', 'Is it?', 'Yes!', 'No.', '...',
    '!!!???', '-', '--', '---', 'end.', '.start', '—', "It's 5 o'clock.",
    '“Hello,” she said.', '‘Yes,’ he replied — it’s fine…', '„German“ and «French» and ‹single›.',
    'He is 5′ 6″ tall.', 'A bullet • point.', 'Dash – en and — em.', 'non‑breaking‑hyphen',
    # non-ASCII Latin text and symbols
    'café', 'naïve', 'Zürich', 'Ærø', 'Łódź', 'Straße', 'ß', 'smörgåsbord', 'façade', 'jalapeño',
    'Ångström', 'Dvořák', 'Œuvre', 'Þór', 'ðe', 'Ħal', 'Đorđe', 'İstanbul', 'µm', '½ cup', '5°C',
    '©2023', 'Brand® and Name™', '±3', '2×3', '6÷2', '§5', '¶', '¿Qué?', '¡Hola!', 'Ａｂｃ',
    'ﬁnd', 'x² + y³', 'zero\u200bwidth', 'no\u00a0break', 'line\u2028sep', 'para\u2029sep',
    'Ŋ and ŋ', 'ĸ ı ŀ ŉ', 'Ŧ ŧ Ŀ', 'Per mille ‰', '¼ and ¾', 'E = mc²', 'naïve café in Zürich at 5 p.m.',
    'I love it 😀👍', 'Flags 🇺🇸 and hearts ❤️', 'Emoji only: 🎉',
    # long words, mixed
    'supercalifragilisticexpialidocious', 'pneumonoultramicroscopicsilicovolcanoconiosis',
    'a' * 500, 'ab' * 300, 'the' * 200, 'Hello world', 'The quick brown fox jumps over the lazy dog.',
    "On Jan. 5th, 2021, Dr. Smith paid $1,234.56 for 3.5 lbs of café au lait at St. Mary's.",
    'In 1999, Mrs. Jones (aged 67) won £250 and bought 3 Ångström-thin films on the 22nd.',
    '', ' ', '\n', '\x00\x01\x1f control', '\x1c\x1d separators',
]

SENTENCES = HANDWRITTEN + [f'There were {n} of them.' for n in NUMBERS] + \
    [f'In {n}, the {n}th man paid ${n}.{n % 100:02d}' for n in NUMBERS]

# unidecode romanizes Chinese ('中文' -> 'Zhong Wen '); this port drops CJK (see to_ascii), so these
# are checked separately and not against the original.
CJK = ['我爱你', 'Tokyo 東京 is big.', '中文 and English']


# ------------------------------------------------------------------------------------------------
# Against the original
# ------------------------------------------------------------------------------------------------
def test_enough_sentences():
    assert len(SENTENCES) >= 200


@pytest.mark.parametrize('text', SENTENCES)
def test_clean_text_matches_original(original, text):
    assert clean_text(text) == original.english_cleaners(text)


@pytest.mark.parametrize('text', SENTENCES)
def test_encode_matches_original(tokenizer, original_tokenizer, text):
    assert tokenizer.encode(text) == original_tokenizer.encode(text)


def test_shipped_texts_match_original(tokenizer, original_tokenizer, shipped_texts):
    lines = [line for text in shipped_texts.values() for line in text.splitlines() if line.strip()]
    assert len(lines) > 50
    assert [tokenizer.encode(line) for line in lines] == [original_tokenizer.encode(line) for line in lines]


def test_longest_shipped_text(tokenizer, original_tokenizer, shipped_texts):
    text = ' '.join(max(shipped_texts.values(), key=len).split('\n'))
    start = time.perf_counter()
    ours = tokenizer.encode(text)
    middle = time.perf_counter()
    theirs = original_tokenizer.encode(text)
    print(f'{len(text)} chars: ours {middle - start:.4f}s, original {time.perf_counter() - middle:.4f}s')
    assert len(ours) > 1000 and ours == theirs


def test_pre_tokenizer_matches_original(original, tokenizer_json, tmp_path):
    """Tortoise's merges never join a letter and a punctuation mark, so add two that would: words
    must split as tokenizers' Whitespace pre-tokenizer splits them ('x.' stays 'x' '.')."""
    data = json.loads(tokenizer_json.read_text(encoding='utf-8'))
    data['model']['vocab'].update({'x.': 255, '..': 256})
    data['model']['merges'] += ['x .', '. .']
    path = tmp_path / 'tokenizer.json'
    path.write_text(json.dumps(data), encoding='utf-8')
    ours, theirs = Tokenizer.from_file(path), original.VoiceBpeTokenizer(vocab_file=str(path))
    for text in ['a x. b', 'Wait... x..x', 'x.x.x.', '_x._', 'x. x.. x...']:
        assert ours.encode(text) == theirs.encode(text)
    assert 256 in ours.encode('Wait...') and 255 not in ours.encode('x.')


def test_decode_matches_original(tokenizer, original_tokenizer):
    ids = tokenizer.encode("On Jan. 5th, Dr. Smith & co. paid $3 -- 'really'?") + [0, 1, 2, 254, 999]
    assert tokenizer.decode(ids) == original_tokenizer.decode(ids)


def test_number_to_words_matches_inflect(original):
    numbers = list(range(2000)) + [10 ** k + d for k in range(3, 36) for d in (-1, 0, 1, 20, 101, 999)]
    for n in numbers:
        assert number_to_words(n) == original._inflect.number_to_words(n, andword=''), n
        assert number_to_words(n, andword=' and ') == original._inflect.number_to_words(n), n


def test_too_many_digits_raise_like_original(original):
    text = '1' + '0' * 36
    with pytest.raises(Exception):
        original.english_cleaners(text)
    with pytest.raises(ValueError):
        clean_text(text)


@pytest.mark.parametrize('block', [(0x00, 0x80), (0x80, 0x100), (0x100, 0x180), (0x2000, 0x2070)],
                         ids=['ascii', 'latin-1', 'latin-extended-a', 'general-punctuation'])
def test_to_ascii_matches_unidecode(block):
    from unidecode import unidecode
    chars = [chr(c) for c in range(*block)]
    assert [to_ascii(c) for c in chars] == [unidecode(c) for c in chars]


# ------------------------------------------------------------------------------------------------
# Round trip, unknown characters, file formats
# ------------------------------------------------------------------------------------------------
def test_round_trip(tokenizer):
    known = [t for t in SENTENCES if set(clean_text(t)) <= set(tokenizer.vocab) | {' '}]
    assert len(known) > 100
    for text in known:
        assert tokenizer.decode(tokenizer.encode(text)) == clean_text(text)


def test_round_trip_drops_unknown(tokenizer):
    for text in SENTENCES:
        kept = ''.join(c for c in clean_text(text) if c in tokenizer.vocab or c == ' ')
        assert tokenizer.decode(tokenizer.encode(text)) == kept


def test_unknown_characters(tokenizer):
    assert tokenizer.encode('a&b') == [14, 1, 15]
    assert tokenizer.encode('#_@*') == [1, 1, 1, 1]          # one [UNK] per character
    for text in CJK + ['\x00\x7f', '\ud800', '\U0010ffff', '🎉' * 50]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < len(tokenizer.vocab) for i in ids)


def test_cjk_is_dropped():
    assert clean_text('Tokyo 東京 is big.') == 'tokyo is big.'


def test_hello_world(tokenizer):
    assert tokenizer.encode('Hello world') == [62, 84, 28, 2, 179, 79]
    assert len(tokenizer.vocab) == 255 and len(tokenizer.merges) == 215
    assert (tokenizer.vocab['[STOP]'], tokenizer.vocab['[UNK]'], tokenizer.vocab['[SPACE]']) == (0, 1, 2)


def test_merge_and_bpe():
    assert merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]
    ranks = {(1, 2): (0, 10), (10, 3): (1, 11), (2, 3): (2, 12)}
    assert bpe([1, 2, 3], ranks) == [11]             # (1, 2) outranks (2, 3)
    assert bpe([4, 2, 3], ranks) == [4, 12]
    assert bpe([5], ranks) == [5]


def test_from_vocab_and_merges(tokenizer):
    """The checkpoint stores vocab and merges (as JSON-like lists); rebuilding gives the same ids."""
    saved = json.loads(json.dumps({'vocab': tokenizer.vocab, 'merges': tokenizer.merges}))
    rebuilt = Tokenizer(saved['vocab'], saved['merges'])
    assert rebuilt.merges == tokenizer.merges
    assert [rebuilt.encode(t) for t in SENTENCES] == [tokenizer.encode(t) for t in SENTENCES]


# ---------------------------------------------------------------------------------------------------
# Audio front end: against transformers' ClvpFeatureExtractor (numpy, float64), whose defaults are
# Tortoise's TorchMelSpectrogram; called with defaults it pads at the end or cuts from the start to 6 s,
# exactly format_conditioning.
# ---------------------------------------------------------------------------------------------------

MEL_TOL = 1e-3  # max abs difference on the (normalized) log-mel scale
transformers.logging.set_verbosity_error()  # the extractor warns on every call otherwise

@pytest.fixture(scope="session")
def mel_norms(tortoise_src) -> torch.Tensor:
    """Tortoise's own mel_norms.pth, which data/mel_norms.safetensors holds exactly."""
    norms = torch.load(tortoise_src / "tortoise" / "data" / "mel_norms.pth", weights_only=True)
    assert norms.shape == (N_MELS,) and torch.equal(clvp.read_mel_norms(clvp.SHIPPED[1]), norms)
    return norms


@pytest.fixture(scope="session")
def voice_clips(tortoise_src) -> list:
    clips = sorted(glob.glob(str(tortoise_src / "tortoise" / "voices" / "*" / "*.wav")))
    assert len(clips) >= 60, f"expected the ~70 shipped voice clips, found {len(clips)}"
    return clips


@pytest.fixture(scope="session")
def extractor(mel_norms):
    return ClvpFeatureExtractor(mel_norms=mel_norms.tolist())


@pytest.fixture(scope="session")
def extractor_raw():
    return ClvpFeatureExtractor()  # no mel_norms: plain log-mel


def reference_mel(fe, wav: torch.Tensor, pad_to_6s: bool = True) -> np.ndarray:
    """[samples] -> [80, frames] from ClvpFeatureExtractor (float64 numpy inside)."""
    kw = {} if pad_to_6s else dict(padding=False, truncation=False)
    out = fe(wav.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="np", **kw)["input_features"]
    assert out.shape[0] == 1
    return out[0]


def synthetic(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    return {
        "silence": torch.zeros(2 * SAMPLE_RATE),
        "sine": 0.5 * torch.sin(2 * math.pi * 440.0 * t),
        "noise": 0.3 * torch.randn(3 * SAMPLE_RATE, generator=g),
        "short500": 0.3 * torch.randn(500, generator=g),            # shorter than one window
        "long10s": 0.1 * torch.randn(10 * SAMPLE_RATE, generator=g),  # exercises the cut
        "full_scale": torch.sign(torch.sin(2 * math.pi * 100.0 * t)),  # square wave at +-1
    }[name].float()


# ---------------------------------------------------------------------------
# (a) parity with ClvpFeatureExtractor
# ---------------------------------------------------------------------------
def test_filterbank_matches_transformers():
    ref = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="htk").T
    ours64 = mel_filterbank(torch.device("cpu"), torch.float64).numpy()
    ours32 = mel_filterbank().numpy()
    assert ours32.shape == ours64.shape == ref.shape == (80, 513)
    np.testing.assert_allclose(ours64, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours32, ref, rtol=1e-6, atol=1e-9)
    assert (ours64.max(axis=1) > 0).all(), "every band must pick up some FFT bin"
    assert (ours64[:, 372:] == 0).all(), "nothing above 8 kHz (bin 371.5)"
    assert mel_filterbank() is mel_filterbank(), "filterbank should be built once and cached"


def test_voice_clips_match_extractor(voice_clips, mel_norms, extractor, extractor_raw):
    """Every shipped voice clip, cut/padded to 6 s: normalized and plain log-mel."""
    worst = {}
    for path in voice_clips:
        wav = load_audio(path)
        cond = format_conditioning(wav)
        ours = log_mel_spectrogram(cond, mel_norms).numpy()
        ref = reference_mel(extractor, wav)  # the extractor pads/cuts to 6 s itself
        assert ours.shape == ref.shape == (N_MELS, 1 + CONDITIONING_SAMPLES // HOP)
        plain = np.abs(log_mel_spectrogram(cond).numpy() - reference_mel(extractor_raw, wav)).max()
        worst[os.path.relpath(path, os.path.dirname(os.path.dirname(path)))] = (np.abs(ours - ref).max(), plain)
    print("\nper-clip max abs diff (normalized, plain log):")
    for name, (d, p) in sorted(worst.items()):
        print(f"  {name:28s} {d:.2e} {p:.2e}")
    name, (d, p) = max(worst.items(), key=lambda kv: max(kv[1]))
    assert max(d, p) <= MEL_TOL, f"{name}: max abs diff {d:.3g} (normalized) / {p:.3g} (plain)"


def test_full_length_voice_clips_match_extractor(voice_clips, mel_norms, extractor):
    """Whole clips, no padding or truncation on either side: frames must line up too."""
    worst = 0.0
    for path in voice_clips:
        wav = load_audio(path)
        ours = log_mel_spectrogram(wav, mel_norms).numpy()
        ref = reference_mel(extractor, wav, pad_to_6s=False)
        assert ours.shape == ref.shape == (N_MELS, 1 + len(wav) // HOP), path
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"\nfull-length clips: max abs diff {worst:.2e}")
    assert worst <= MEL_TOL


@pytest.mark.parametrize("name", ["silence", "sine", "noise", "short500", "long10s", "full_scale"])
def test_synthetic_signals_match_extractor(name, mel_norms, extractor, extractor_raw):
    wav = synthetic(name)
    cond = format_conditioning(wav)
    ours = log_mel_spectrogram(cond, mel_norms).numpy()
    ref = reference_mel(extractor, wav)
    assert ours.shape == ref.shape == (N_MELS, 517)
    d = np.abs(ours - ref).max()
    p = np.abs(log_mel_spectrogram(cond).numpy() - reference_mel(extractor_raw, wav)).max()
    print(f"\n{name}: max abs diff {d:.2e} (normalized), {p:.2e} (plain)")
    assert d <= MEL_TOL and p <= MEL_TOL


def test_silence_hits_the_floor(mel_norms):
    out = log_mel_spectrogram(torch.zeros(CONDITIONING_SAMPLES))
    np.testing.assert_allclose(out.numpy(), math.log(1e-5), rtol=1e-6)
    normed = log_mel_spectrogram(torch.zeros(CONDITIONING_SAMPLES), mel_norms)
    torch.testing.assert_close(normed, out / mel_norms[:, None])


# ---------------------------------------------------------------------------
# (b) shapes, batching, dtype
# ---------------------------------------------------------------------------
def test_batch_equals_rows(mel_norms):
    batch = torch.stack([synthetic("sine")[:40000], synthetic("noise")[:40000], torch.zeros(40000)])
    out = log_mel_spectrogram(batch, mel_norms)
    assert out.shape == (3, N_MELS, 1 + 40000 // HOP)
    for i in range(3):
        torch.testing.assert_close(out[i], log_mel_spectrogram(batch[i], mel_norms), rtol=0, atol=1e-5)
    assert not torch.allclose(out[0], out[1]), "rows must not be mixed up"


@pytest.mark.parametrize("n", [MIN_SAMPLES, 1000, 22050, CONDITIONING_SAMPLES])
def test_frame_count(n):
    assert log_mel_spectrogram(torch.randn(n)).shape == (N_MELS, 1 + n // HOP)


def test_follows_input_dtype():
    wav = synthetic("noise")
    out64 = log_mel_spectrogram(wav.double())
    assert out64.dtype == torch.float64 and log_mel_spectrogram(wav).dtype == torch.float32
    torch.testing.assert_close(out64.float(), log_mel_spectrogram(wav), rtol=0, atol=1e-4)


def test_mel_norms_divide_each_band(mel_norms):
    wav = synthetic("noise")
    torch.testing.assert_close(log_mel_spectrogram(wav, mel_norms) * mel_norms[:, None], log_mel_spectrogram(wav))


def test_too_short_for_stft():
    with pytest.raises(AudioError, match=str(MIN_SAMPLES)):
        log_mel_spectrogram(torch.zeros(MIN_SAMPLES - 1))


def test_format_conditioning_pads_at_end_and_cuts_from_start():
    short = torch.randn(1000)
    padded = format_conditioning(short)
    assert padded.shape == (CONDITIONING_SAMPLES,)
    assert torch.equal(padded[:1000], short) and not padded[1000:].any()
    long = torch.randn(CONDITIONING_SAMPLES + 5000)
    assert torch.equal(format_conditioning(long), long[:CONDITIONING_SAMPLES])  # deterministic: first 6 s
    exact = torch.randn(CONDITIONING_SAMPLES)
    assert torch.equal(format_conditioning(exact), exact)
    assert format_conditioning(torch.randn(2, 1000)).shape == (2, CONDITIONING_SAMPLES)


# ---------------------------------------------------------------------------
# (c) load_audio
# ---------------------------------------------------------------------------
def sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wav: torch.Tensor, sr=SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    return float(np.argmax(spectrum) * sr / len(wav))


def test_load_float_wav_unchanged(tmp_path):
    x = sine(440, SAMPLE_RATE)
    soundfile.write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="FLOAT")
    wav = load_audio(str(tmp_path / "a.wav"))
    assert wav.dtype == torch.float32 and wav.ndim == 1
    assert torch.equal(wav, torch.from_numpy(x))


def test_int16_scaled_to_unit_range(tmp_path):
    ints = np.array([0, 16384, -16384, 32767, -32768] * 200, dtype=np.int16)
    soundfile.write(tmp_path / "i16.wav", ints, SAMPLE_RATE, subtype="PCM_16")
    wav = load_audio(str(tmp_path / "i16.wav"))
    torch.testing.assert_close(wav, torch.from_numpy(ints.astype(np.float32) / 32768.0), rtol=0, atol=0)
    assert wav.min() == -1.0 and wav[1] == 0.5


def test_int32_scaled_to_unit_range(tmp_path):
    ints = np.array([0, 2**30, -(2**30), -(2**31)] * 200, dtype=np.int32)
    soundfile.write(tmp_path / "i32.wav", ints, SAMPLE_RATE, subtype="PCM_32")
    wav = load_audio(str(tmp_path / "i32.wav"))
    np.testing.assert_allclose(wav[:4].numpy(), [0.0, 0.5, -0.5, -1.0])


def test_stereo_averaged(tmp_path):
    left, right = sine(440, SAMPLE_RATE, amp=0.6), np.full(SAMPLE_RATE, 0.2, np.float32)
    soundfile.write(tmp_path / "st.wav", np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    wav = load_audio(str(tmp_path / "st.wav"))
    torch.testing.assert_close(wav, torch.from_numpy((left + right) / 2))


def test_six_channels_averaged(tmp_path):
    chans = np.stack([np.full(5000, v, np.float32) for v in (0.6, -0.6, 0.3, 0.0, 0.9, 0.0)], axis=1)
    soundfile.write(tmp_path / "51.wav", chans, SAMPLE_RATE, subtype="FLOAT")
    wav = load_audio(str(tmp_path / "51.wav"))
    assert wav.shape == (5000,)
    torch.testing.assert_close(wav, torch.full((5000,), 0.2))


@pytest.mark.parametrize("sr", [8000, 16000, 44100, 48000])
def test_resampled_to_22050(tmp_path, sr):
    n = int(1.5 * sr)
    soundfile.write(tmp_path / f"{sr}.wav", sine(440, sr, 1.5), sr, subtype="FLOAT")
    wav = load_audio(str(tmp_path / f"{sr}.wav"))
    assert wav.shape == (math.ceil(n * SAMPLE_RATE / sr),)  # 1.5 s -> 33075 samples
    assert abs(peak_hz(wav) - 440) < 1.0, "pitch must survive resampling"
    assert 0.45 < wav[1000:-1000].abs().max() < 0.55, "amplitude must survive resampling"


def test_resample_to_other_rate(tmp_path):
    soundfile.write(tmp_path / "a.wav", sine(440, SAMPLE_RATE), SAMPLE_RATE)
    assert load_audio(str(tmp_path / "a.wav"), sampling_rate=16000).shape == (16000,)


def test_clipped_to_unit_range(tmp_path):
    x = np.array([0.5, 1.5, -2.0, 1.0, -1.0, 0.99] * 200, dtype=np.float32)
    soundfile.write(tmp_path / "hot.wav", x, SAMPLE_RATE, subtype="FLOAT")
    wav = load_audio(str(tmp_path / "hot.wav"))
    torch.testing.assert_close(wav, torch.from_numpy(np.clip(x, -1, 1)))
    assert wav.max() == 1.0 and wav.min() == -1.0


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_other_containers(tmp_path, fmt, ext):
    path = tmp_path / f"a.{ext}"
    soundfile.write(path, sine(440, SAMPLE_RATE, 2.0), SAMPLE_RATE, format=fmt)
    wav = load_audio(str(path))
    assert abs(len(wav) - 2 * SAMPLE_RATE) <= 2048  # lossy codecs may add priming/padding
    assert abs(peak_hz(wav) - 440) < 1.0


def test_loads_shipped_voice_clip(voice_clips):
    wav = load_audio(voice_clips[0])
    assert wav.ndim == 1 and wav.dtype == torch.float32 and len(wav) > SAMPLE_RATE
    assert -1.0 <= wav.min() < 0 < wav.max() <= 1.0


# ---------------------------------------------------------------------------
# (d) a silent clip warns, a quiet one does not (bad audio files: test_hostile.py)
# ---------------------------------------------------------------------------
def test_silent_file_warns_but_loads(tmp_path):
    path = tmp_path / "silence.wav"
    soundfile.write(path, np.zeros(SAMPLE_RATE, np.int16), SAMPLE_RATE, subtype="PCM_16")
    with pytest.warns(UserWarning, match="silent"):
        wav = load_audio(str(path))
    assert wav.shape == (SAMPLE_RATE,) and not wav.any()


def test_quiet_speech_does_not_warn(tmp_path):
    path = tmp_path / "quiet.wav"
    soundfile.write(path, sine(440, SAMPLE_RATE, amp=0.01), SAMPLE_RATE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio(str(path))


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------


def test_decoder_is_causal(tiny_pair):
    """A position's output depends on nothing after it: change the last inputs, the earlier outputs stay."""
    _, model = tiny_pair
    torch.manual_seed(13)
    x = torch.randn(2, 12, model.config.decoder.dim)
    y = x.clone()
    y[:, 8:] = torch.randn(2, 4, model.config.decoder.dim)
    with torch.inference_mode():
        a, b = model.decoder(x), model.decoder(y)
    assert maxdiff(a[:, :8], b[:, :8]) <= 1e-6 and maxdiff(a[:, 8:], b[:, 8:]) > 1e-3


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(14)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    cos, sin = clvp.rotary_tables(40, 32, "cpu")

    def score(i, j):                                          # q at position i against k at position j
        return (clvp.apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * clvp.apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum()

    assert abs(score(3, 10) - score(20, 27)) < 1e-4          # the same offset, the same score
    assert abs(score(3, 10) - score(3, 11)) > 1e-3
    rotated = clvp.apply_rotary(q.expand(1, 1, 40, 64), cos, sin)
    assert torch.equal(rotated[..., 32:], q.expand(1, 1, 40, 64)[..., 32:])    # past rotary_dim: untouched
    assert maxdiff(rotated.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 40)) <= 1e-5   # a rotation keeps the norm


# ---------------------------------------------------------------------------------------------------
# The CLVP model: its four networks and what a user asks of them
# ---------------------------------------------------------------------------------------------------


def reference_greedy(ref, mels, text_ids, steps):
    """transformers' greedy generate, as ClvpModelForConditionalGeneration.generate runs it, with the
    per-step logits: the prompt text is ids + [0] (the conditioning encoder adds [255] and another [0])."""
    text = torch.nn.functional.pad(text_ids, (0, 1), value=0)
    cond = ref.conditioning_encoder(input_features=mels, input_ids=text)
    out = ref.speech_decoder_model.generate(conditioning_embeds=cond, do_sample=False, max_new_tokens=steps,
                                            min_new_tokens=steps, output_logits=True,
                                            return_dict_in_generate=True, pad_token_id=8193)
    return out.sequences[:, 1:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("pair", ["tiny_pair", pytest.param("official_pair", marks=FULL)])
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


@pytest.mark.parametrize("pair, steps", [("tiny_pair", 30), pytest.param("official_pair", 8, marks=FULL)])
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


def test_contrastive_loss_matches_definition_and_trains(tiny_pair):
    _, trained = tiny_pair
    model = clvp.DecoderAndCLVP(trained.config)
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


def ranks(x):
    return x.argsort().argsort().double()


@FULL
def test_bf16_agrees_with_fp32_at_the_official_size(official_pair):
    """bf16 weights, fp32 attention on the CPU: how far the teacher-forced logits move, and whether the 16
    CLVP scores keep their order (Spearman's rank correlation)."""
    import copy
    _, model = official_pair
    half = copy.deepcopy(model).to(torch.bfloat16)
    torch.manual_seed(15)
    mels, text = torch.randn(1, 80, 200), torch.randint(1, 250, (1, 20))
    speech, candidates = torch.randint(0, 8192, (1, 40)), torch.randint(0, 8192, (16, 100))
    with torch.inference_mode():
        keep = [i for i in range(8194) if i != 8192]
        delta = (model.speech_logits(mels, text, speech) - half.speech_logits(mels, text, speech).float())[..., keep]
        scores, low = model.similarity(text, candidates)[0], half.similarity(text, candidates)[0].float()
    spearman = torch.corrcoef(torch.stack([ranks(scores), ranks(low)]))[0, 1].item()
    assert delta.abs().max() < BF16_MAX and delta.abs().mean() < BF16_MEAN and spearman > BF16_RANK


@FULL
def test_a_bf16_cache_decodes_close_to_fp32(official_pair):
    """bf16 weights and a bf16 KV cache (the rule's choice on a CPU with AVX-512 BF16; given here, so the
    test runs on any CPU): two texts' prefill and 20 cached steps, three rows, against fp32 uncached."""
    import copy
    _, model = official_pair
    half = copy.deepcopy(model).to(torch.bfloat16)
    torch.manual_seed(16)
    mels, texts = torch.randn(1, 80, 200), [torch.randint(1, 250, (n,)) for n in (20, 12)]
    rows, speech = torch.tensor([0, 0, 1]), torch.randint(0, 8192, (3, 20))
    with torch.inference_mode():
        low = cached_logits(half, mels.bfloat16(), texts, rows, speech, torch.bfloat16).float()
        full = torch.cat([model.speech_logits(mels, texts[t][None], speech[b:b + 1]) for b, t in enumerate(rows)])
    delta = (full - low)[..., [i for i in range(8194) if i != 8192]]
    assert delta.abs().max() < BF16_MAX and delta.abs().mean() < BF16_MEAN, (delta.abs().max(), delta.abs().mean())


@pytest.mark.parametrize("amx, bf16", [(False, False), (False, True), (True, True)])
def test_attention_and_cache_dtypes_follow_the_cpus_kernels(monkeypatch, amx, bf16):
    # The CUDA half of this cannot run without a GPU; what decides it can. Each CPU kind is simulated.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    assert clvp.attention_dtype("cpu", torch.bfloat16) == (torch.bfloat16 if amx else torch.float32)
    assert clvp.cache_dtype("cpu", torch.bfloat16) == (torch.bfloat16 if bf16 else torch.float32)
    assert clvp.attention_dtype("cpu", torch.float16) == clvp.cache_dtype("cpu", torch.float16) == torch.float32
    for rule in (clvp.attention_dtype, clvp.cache_dtype):
        assert rule("cpu", torch.float32) == rule("cuda", torch.float32) == torch.float32
        assert rule("cuda", torch.bfloat16) == torch.bfloat16 and rule(torch.device("cuda", 1), torch.float16) == torch.float16


def test_a_forced_cache_dtype_is_used_and_checked(tiny_pair):
    _, model = tiny_pair
    assert clvp.cache_dtype("cpu", torch.float32, "bfloat16") == torch.bfloat16
    assert clvp.cache_dtype("cpu", torch.bfloat16, "float32") == torch.float32
    import copy
    half, mels = copy.deepcopy(model).to(torch.bfloat16), torch.randn(1, 80, 50)
    for m, cache in ((model, "bfloat16"), (half, "float32")):   # the model's dtype and the cache's differ
        gen = m.generate(torch.tensor([5, 6]), mels.to(m.logit_scale.dtype), num_candidates=2, max_new_tokens=4,
                         temperature=0, cache_dtype=cache)
        assert gen.candidates.shape == (2, 4)
    with pytest.raises(ValueError, match="cache_dtype must be None or one of float32, bfloat16, float16, not 'int8'"):
        model.generate(torch.tensor([5, 6]), torch.randn(1, 80, 50), cache_dtype="int8")


def test_half_precision_runs_close_to_fp32(tiny_pair):
    _, model = tiny_pair
    import copy
    half = copy.deepcopy(model).to(torch.bfloat16)
    torch.manual_seed(12)
    mels = torch.randn(1, 80, 100)
    text = torch.randint(1, 250, (1, 9))
    speech = torch.randint(0, 8192, (1, 12))
    with torch.inference_mode():
        full = model.speech_logits(mels, text, speech)
        low = half.speech_logits(mels.bfloat16(), text, speech).float()
        keep = [i for i in range(8194) if i != 8192]
        assert maxdiff(full[..., keep], low[..., keep]) < 0.05 * full[..., keep].abs().max().item()
        sim, sim_low = model.similarity(text, speech), half.similarity(text, speech).float()
        assert maxdiff(sim, sim_low) < 0.1
    gen = half.generate(text, mels.bfloat16(), num_candidates=3, max_new_tokens=10, seed=0)
    assert gen.candidates.shape == (3, 10) and torch.isfinite(gen.scores.float()).all()


# ---------------------------------------------------------------------------------------------------
# Generation and reranking
# ---------------------------------------------------------------------------------------------------


def cached_logits(model, mels, texts, rows, speech, dtype=torch.float32):
    """Logits [B, S + 1, vocab] of the prefill and S decode steps: row b decodes text rows[b] and is fed
    speech[b]; the texts' prompts are left-padded, prefilled together and stored once each."""
    dec = model.decoder
    latent = model.voice_latent(mels)[None]
    prompts = [dec.prompt(latent, t[None])[0] for t in texts]
    P = max(len(p) for p in prompts)
    shared = clvp.PromptCache(dec.config, len(texts), P, "cpu", dtype, torch.tensor([P - len(p) for p in prompts]))
    first = clvp.prefill(dec, torch.stack([torch.nn.functional.pad(p, (0, 0, P - len(p), 0)) for p in prompts]), shared)
    cache = clvp.StepCache(shared, rows, speech.shape[1])
    steps = [first[rows]] + [clvp.decode_step(dec, speech[:, k], k + 1, cache, P) for k in range(speech.shape[1])]
    return torch.stack(steps, dim=1)


def lesson_logits(model, mels, text, speech):
    """The same through Part I's plain KVCache, for one text [T] and its rows' tokens speech [B, S]: the prompt
    prefilled in one row, then B copies of that row decode."""
    dec, B, S = model.decoder, *speech.shape
    prompt = dec.prompt(model.voice_latent(mels)[None], text[None])
    P = prompt.shape[1]
    one = clvp.KVCache.empty(dec.config, 1, P + S, "cpu", prompt.dtype)
    first, cache = clvp.prefill(dec, prompt, one).repeat(B, 1), one.repeat(B)
    steps = [first] + [clvp.decode_step(dec, speech[:, k], k + 1, cache, P) for k in range(S)]
    return torch.stack(steps, dim=1)


def test_prefill_and_decode_step_equal_the_uncached_logits(tiny_pair):
    _, model = tiny_pair
    torch.manual_seed(4)
    mels = torch.randn(1, 80, 100)
    text = torch.randint(1, 250, (1, 9))
    speech = torch.randint(0, 8192, (1, 25))
    with torch.inference_mode():
        full = model.speech_logits(mels, text, speech)
        cached = cached_logits(model, mels, [text[0]], torch.tensor([0]), speech)
        lesson = lesson_logits(model, mels, text[0], speech)
    assert maxdiff(cached, full) <= 1e-5 and maxdiff(lesson, full) <= 1e-5


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
                                          seed=seed, keep=2)
    a, b, c = run(7, 2), run(7, 2), run(8, 2)
    assert torch.equal(a.candidates, b.candidates) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.candidates, c.candidates)
    assert a.candidates.shape == (5, 20) and a.scores.shape == (5,) and a.best.shape == (2, 20)
    assert torch.equal(a.best, a.candidates[a.order[:2]])
    assert a.scores[a.order].diff().le(0).all()
    # Scores are CLVP's similarity of the text with each fixed candidate, whatever the batching.
    with torch.inference_mode():
        assert maxdiff(model.similarity(text[None], a.candidates)[0], a.scores) <= 1e-5
    assert maxdiff(model.similarity(text[None], a.candidates)[0], a.scores) <= 1e-5   # usable outside, too
    # Greedy candidates are identical however they are batched, and the prompt is averaged over clips.
    g1 = model.generate(text, mels, num_candidates=3, batch_size=1, max_new_tokens=12, temperature=0)
    g3 = model.generate(text, mels, num_candidates=3, batch_size=3, max_new_tokens=12, temperature=0)
    assert torch.equal(g1.candidates, g3.candidates)
    with torch.inference_mode():
        first = model.speech_logits(mels, text[None], g1.candidates[:1, :0])[0, 0]
    assert g1.candidates[0, 0] == first.argmax()


@pytest.mark.parametrize("pair, block", [("tiny_pair", 32), ("tiny_pair", 3),
                                         pytest.param("official_pair", 8, marks=FULL)])
def test_shared_prompts_give_each_row_its_own_texts_logits(request, monkeypatch, pair, block):
    # Prompts of different lengths, left-padded, masked and stored once per text, read by several rows of
    # each text in one batch (the shared-prompt attention), give every row the logits its text and tokens
    # give alone, uncached: over the prefill and 20 steps, at the official size too; greedy tokens agree.
    # Small blocks make the 20 steps cross several of them.
    monkeypatch.setattr(clvp.StepCache, "BLOCK", block)
    _, model = request.getfixturevalue(pair)
    torch.manual_seed(5)
    mels = torch.randn(1, 80, 100)
    texts = [torch.randint(1, 250, (n,)) for n in (3, 14, 8)]
    rows = torch.tensor([0, 0, 1, 1, 2])
    speech = torch.randint(0, 8192, (5, 20))
    with torch.inference_mode():
        cached = cached_logits(model, mels, texts, rows, speech)                   # [5, 21, vocab]
        alone = torch.cat([model.speech_logits(mels, texts[t][None], speech[b:b + 1]) for b, t in enumerate(rows)])
    keep = [i for i in range(8194) if i != 8192]             # the -1e4 column rounds at 1e-3
    assert maxdiff(cached[..., keep], alone[..., keep]) <= 1e-5
    assert torch.equal(cached.argmax(-1), alone.argmax(-1))


def test_several_texts_decode_together_with_the_same_greedy_results(tiny_pair):
    # The list-of-texts API, and the batch arrangement: every text alone, all in one batch, and batches
    # whose boundaries cut through a text give the same candidates and scores.
    import copy
    model = copy.deepcopy(tiny_pair[1])
    with torch.no_grad():
        model.decoder.head.bias[8193] += 0.5           # the texts stop at steps 6, 10, never and 10
    torch.manual_seed(8)
    mels = torch.randn(1, 80, 100)
    texts = [torch.randint(1, 250, (n,)) for n in (5, 17, 9, 2)]
    options = clvp.DecodingOptions(num_candidates=3, max_new_tokens=16, temperature=0, keep=2, pad_to_max=False)
    alone = [model.generate(t, mels, options, batch_size=3) for t in texts]
    for batch_size in (12, 5, 1):
        together = model.generate(texts, mels, options, batch_size=batch_size)
        assert isinstance(together, list) and len(together) == len(texts)
        for a, b in zip(alone, together):
            assert torch.equal(a.candidates, b.candidates) and torch.equal(a.lengths, b.lengths)
            assert torch.equal(a.best, b.best) and maxdiff(a.scores, b.scores) <= 1e-5
    assert len({int(g.lengths.max()) for g in alone}) > 1                 # the texts did stop differently
    assert len({g.candidates.shape[1] for g in alone}) > 1                # and each keeps its own length


@pytest.mark.parametrize("pair", ["tiny_pair", pytest.param("official_pair", marks=FULL)])
def test_the_engine_gives_the_lessons_logits(request, monkeypatch, pair):
    # Part II against Part I: three texts of different lengths decoded together by the engine (shared prompts,
    # blocks of 8 steps so that 21 steps cross three of them, weights packed as generation packs them), and
    # each text's rows through the lesson's plain KV cache: the prefill and 20 steps agree to 1e-5 in fp32.
    monkeypatch.setattr(clvp.StepCache, "BLOCK", 8)
    _, model = request.getfixturevalue(pair)
    torch.manual_seed(15)
    mels = torch.randn(2, 80, 100)
    texts = [torch.randint(1, 250, (n,)) for n in (4, 19, 9)]
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    speech = torch.randint(0, 8192, (6, 20))
    with torch.inference_mode():
        with clvp.packed_weights(model.decoder, len(rows)):
            engine = cached_logits(model, mels, texts, rows, speech)
        lesson = torch.cat([lesson_logits(model, mels, t, speech[rows == i]) for i, t in enumerate(texts)])
    keep = [i for i in range(8194) if i != 8192]             # the -1e4 column rounds at 1e-3
    assert maxdiff(engine[..., keep], lesson[..., keep]) <= 1e-5
    assert torch.equal(engine.argmax(-1), lesson.argmax(-1))


def test_the_engine_and_the_lesson_generate_the_same(tiny_pair):
    # Through generate: greedy, three texts that the engine decodes together in batches that cut through
    # them, against the lesson one text at a time; and sampled with a seed, one text, the same batches.
    import copy
    model = copy.deepcopy(tiny_pair[1])
    with torch.no_grad():
        model.decoder.head.bias[8193] += 0.5                 # so that candidates stop at different steps
    torch.manual_seed(9)
    mels = torch.randn(1, 80, 100)
    texts = [torch.randint(1, 250, (n,)) for n in (5, 17, 9)]
    options = clvp.DecodingOptions(num_candidates=3, max_new_tokens=16, temperature=0, keep=2, batch_size=4)
    fast, lesson = model.generate(texts, mels, options), model.generate(texts, mels, options, engine="lesson")
    for a, b in zip(fast, lesson):
        assert torch.equal(a.candidates, b.candidates) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.order, b.order) and torch.equal(a.best, b.best) and maxdiff(a.scores, b.scores) <= 1e-5
    assert len({int(g.lengths.max()) for g in fast}) > 1
    sampled = [model.generate(texts[1], mels, num_candidates=5, batch_size=2, max_new_tokens=20, seed=4, engine=e)
               for e in ("fast", "lesson")]
    assert torch.equal(sampled[0].candidates, sampled[1].candidates) and maxdiff(sampled[0].scores, sampled[1].scores) <= 1e-5
    assert len({tuple(c.tolist()) for c in sampled[0].candidates}) > 1     # the seed did sample


def engines_through_the_command_line(capsys, tmp_path, *args):
    """clvp.py run with --engine fast and --engine lesson -> their --json results."""
    results = []
    for engine in ("fast", "lesson"):
        assert clvp.main([*args, "--engine", engine, "--json", "--quiet", "--out", str(tmp_path / f"{engine}.npy")]) == 0
        results.append(json.loads(capsys.readouterr().out)["results"])
    return results


def test_the_command_line_engines_agree_on_a_seeded_sample(capsys, tmp_path):
    fast, lesson = engines_through_the_command_line(
        capsys, tmp_path, "--random-init", "--tiny", "--text", "The engine and the lesson.", "--audio", VOICE,
        "--candidates", "6", "--batch-size", "4", "--max-tokens", "30", "--seed", "11", "--keep", "2")
    assert fast[0]["best"] == lesson[0]["best"] and fast[0]["order"] == lesson[0]["order"]
    assert max(abs(a - b) for a, b in zip(fast[0]["scores"], lesson[0]["scores"])) <= 1e-4


@FULL
def test_the_command_line_engines_agree_at_the_official_size(capsys, tmp_path):
    (tmp_path / "two.txt").write_text("The first line is short.\nThe second line of this file is a good deal longer.\n")
    fast, lesson = engines_through_the_command_line(
        capsys, tmp_path, "--random-init", "--text-file", str(tmp_path / "two.txt"), "--audio", VOICE,
        "--candidates", "2", "--batch-size", "4", "--max-tokens", "24", "--temperature", "0")
    assert [r["decoded_with"] for r in fast] == [2, 2] and [r["decoded_with"] for r in lesson] == [1, 1]
    for a, b in zip(fast, lesson):
        assert a["best"] == b["best"] and max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) <= 1e-4


def test_fix_candidates_like_tortoise():
    tokens = torch.tensor([[5, 6, 7, 8193, 9, 8193, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    fixed, lengths = clvp.fix_candidates(tokens, 8193)
    assert fixed.tolist() == [[5, 6, 7, 83, 83, 45, 45, 248], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert lengths.tolist() == [3, 8]
    padded, _ = clvp.fix_candidates(tokens[1:], 8193, pad_to=10)
    assert padded.tolist() == [[1, 2, 3, 4, 5, 6, 7, 45, 45, 248]]


def test_processors_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper
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
    tied = logits.clone()
    tied[:, :60] = 50.0                                              # ties at the k-th are kept, as there
    for k in (1, 50, 8194, 10**6):
        for x in (logits, tied):
            assert torch.equal(clvp.top_k_filter(x, k), TopKLogitsWarper(min(k, 8194))(ids, x.clone()))


def test_sample_top_k_draws_only_among_the_k_best():
    """--sample-top-k 3: every token drawn is one of the 3 most likely after the penalty and temperature."""
    torch.manual_seed(1)
    logits, seen = torch.randn(64, 100), torch.zeros(64, 100, dtype=torch.bool)
    options = clvp.DecodingOptions(temperature=1.0, top_p=1.0, sample_top_k=3)
    drawn = torch.stack([clvp.next_tokens(logits.clone(), seen, options, None) for _ in range(20)], 1)   # [64, 20]
    best3 = logits.topk(3, dim=-1).indices
    assert (drawn[:, :, None] == best3[:, None]).any(-1).all()
    assert len(drawn.unique()) > 3                              # rows differ: not one global top 3


# ---------------------------------------------------------------------------------------------------
# Loading: one file holds config, weights, tokenizer and mel norms
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Command line: python clvp.py --text "..." --audio voice.wav
# ---------------------------------------------------------------------------------------------------


def cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "clvp.py"), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_cli_table_and_npy(tiny_checkpoint, tmp_path):
    out = tmp_path / "best.npy"
    r = cli("--text", "Hello there.", "--audio", VOICE, "--checkpoint", tiny_checkpoint, "--candidates", 5,
            "--batch-size", 2, "--max-tokens", 30, "--seed", 1, "--top-k", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "rank" in r.stdout and "score" in r.stdout and f"written to {out}" in r.stdout
    assert len([line for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]) == 5
    best = np.load(out)
    assert best.shape == (2, 30) and best.dtype == np.int64
    again = tmp_path / "again.npy"
    assert cli("--text", "Hello there.", "--audio", VOICE, "--checkpoint", tiny_checkpoint, "--candidates", 5,
               "--batch-size", 2, "--max-tokens", 30, "--seed", 1, "--top-k", 2, "--out", again).returncode == 0
    assert np.array_equal(np.load(again), best)                 # same seed, same candidates


def test_cli_json_and_text_file(tiny_checkpoint, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("The first sentence.\n\nAnd a second one, with 2 numbers: 3.\n")
    r = cli("--text-file", lines, "--audio", VOICE, VOICE, "--checkpoint", tiny_checkpoint, "--candidates", 3,
            "--max-tokens", 12, "--json", "--out", tmp_path / "b.npy")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [x["text"] for x in report["results"]] == ["The first sentence.", "And a second one, with 2 numbers: 3."]
    for i, result in enumerate(report["results"]):
        assert sorted(result["order"]) == [0, 1, 2] and len(result["scores"]) == 3
        assert result["out"] == str(tmp_path / f"b-{i + 1}.npy")
        assert np.load(result["out"]).tolist() == result["best"]
        assert max(result["scores"]) == result["scores"][result["order"][0]]


def test_cli_text_file_lines_decode_together_with_the_same_results(tiny_checkpoint, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("One.\nA much longer second line, to pad the first.\nThree words here.\n")
    runs = {}
    for batch in (2, 4, 6):        # one line per batch; two lines, then one; all three together
        r = cli("--text-file", lines, "--audio", VOICE, "--checkpoint", tiny_checkpoint, "--candidates", 2,
                "--batch-size", batch, "--temperature", 0, "--max-tokens", 10, "--json", "--out", tmp_path / f"{batch}.npy")
        assert r.returncode == 0, r.stderr
        runs[batch] = json.loads(r.stdout)["results"]
    assert [x["decoded_with"] for x in runs[2]] == [1, 1, 1] and [x["decoded_with"] for x in runs[4]] == [2, 2, 1]
    assert [x["decoded_with"] for x in runs[6]] == [3, 3, 3]
    for batch in (4, 6):
        for a, b in zip(runs[2], runs[batch]):
            assert a["best"] == b["best"] and a["lengths"] == b["lengths"]
            assert np.allclose(a["scores"], b["scores"], atol=1e-5)
            assert np.load(b["out"]).tolist() == b["best"]


def test_cli_random_init_explain(tmp_path):
    r = cli("--text", "Hi there.", "--audio", VOICE, "--random-init", "--tiny", "--explain", "--candidates", 2,
            "--max-tokens", 10, "--out", tmp_path / "best.npy")
    assert r.returncode == 0, r.stderr
    assert "meaningless" in r.stdout
    for stage in ("[text]", "[audio]", "[latent]", "[prompt]", "[prefill]", "[decode]", "[fix]", "[encoders]",
                  "[scores]"):
        assert stage in r.stdout, stage
    assert "mels [1, 80, 517]" in r.stdout and "[1, 64]" in r.stdout


def test_cli_without_checkpoint_explains_how_to_get_one(tmp_path):
    r = cli("--text", "Hi.", "--audio", VOICE, env={"CLVP_CACHE": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "convert_weights.py --download" in r.stderr and str(tmp_path) in r.stderr


def run_main(capsys, *args):
    code = clvp.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_cli_ctrl_c_leaves_no_output(tiny_checkpoint, tmp_path):
    import signal
    out = tmp_path / "best.npy"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "clvp.py"), "--text", "A long run.", "--audio", VOICE,
                          "--checkpoint", tiny_checkpoint, "--candidates", "400", "--batch-size", "8", "--explain",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # even where we ignore it
    for line in p.stdout:                                        # --explain's last line before decoding starts
        if line.startswith("[decode]"):
            break
    time.sleep(1)
    assert p.poll() is None                                      # still generating
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Long texts: cut into parts as Tortoise's read.py cuts them (split_text; equal to the original's
# split_and_recombine_text on random texts in test_tortoise.py), each part ranked on its own
# ---------------------------------------------------------------------------------------------------

PARAGRAPH = (
    "The lighthouse keeper had kept the same routine for thirty-one years, and he saw no reason to change it "
    "now. Every evening he climbed the one hundred and twelve steps, wiped the salt from the great lens, and "
    "lit the lamp before the sun touched the water. \"A light that comes on late,\" he liked to say, \"is a "
    "light that might as well not come on at all.\" The village below thought him stubborn; the fishermen "
    "thought him a saint. On the night of the storm the power failed twice. The first time he cranked the "
    "old generator by hand until his arms shook! The second time he did not wait for the generator at all; "
    "he lit the oil lamps that his predecessor had left in the cupboard, wrapped in newspaper from a war that "
    "nobody remembered any more... Were they enough? He could not tell. The rain came sideways, the windows "
    "rattled in their frames, and somewhere out in the dark a small boat was trying to find the harbour "
    "mouth. At a quarter past two he heard the horn, three short blasts and one long, which meant that "
    "someone had seen him. He sat down on the top step and laughed until he coughed. In the morning the "
    "harbour master came up the hill with a basket of bread, a jar of honey and a letter from the mayor, "
    "which the keeper did not open. \"You could have been killed up there,\" said the harbour master. \"Yes,\" "
    "said the keeper, \"and they could have been killed down there. Only one of those was my job.\" He put the "
    "letter in the cupboard beside the newspaper, climbed the steps again, and slept until the afternoon, "
    "when it was time to wipe the lens once more. Years later, when the lighthouse was automated and the "
    "keeper had moved to a small house by the church, children would ask him whether he missed the tower. "
    "He always gave the same answer: that a light does not care who lights it, as long as somebody does, and "
    "that the best nights were the ones when nothing happened at all. Then he would pour them a cup of tea, "
    "far too sweet, and tell them about the storm again, a little differently each time, until the boat had "
    "become a ship and the ship a fleet"
)


def test_split_text_the_originals_own_examples():
    # tortoise/utils/text.py's __main__ tests, with their expected parts.
    text = """
    This is a sample sentence.
    This is another sample sentence.
    This is a longer sample sentence that should force a split inthemiddlebutinotinthislongword.
    "Don't split my quote... please"
    """
    assert clvp.split_text(text, desired_length=20, max_length=40) == [
        'This is a sample sentence.', 'This is another sample sentence.', 'This is a longer sample sentence that',
        'should force a split', 'inthemiddlebutinotinthislongword.', '"Don\'t split my quote... please"']
    text = """
    When you are really angry sometimes you use consecutive exclamation marks!!!!!! Is this a good thing to do?!?!?!
    I don't know but we should handle this situation..........................
    """
    assert clvp.split_text(text, desired_length=30, max_length=50) == [
        'When you are really angry sometimes you use', 'consecutive exclamation marks!!!!!!',
        'Is this a good thing to do?!?!?!', "I don't know but we should handle this situation."]


@pytest.mark.parametrize("text, desired, longest, parts", [
    # a sentence end inside quotes does not cut; a closing quote before a space is only a place to cut back to
    ('"Stop!" she said. "Wait. Please wait." Then nothing.', 10, 30,
     ['"Stop!" she said.', '"Wait. Please wait."', 'Then nothing.']),
    ('He said "one. two. three." and left. Done.', 5, 300, ['He said "one. two. three." and left.', 'Done.']),
    # runs of ! ? . stay with their sentence; what is left of a run past max_length is punctuation, dropped
    ('What?!?! No way!!! Really... yes.', 1, 300, ['What?!?!', 'No way!!!', 'Really...', 'yes.']),
    ('Wow!!!!!!!!!!', 1, 5, ['Wow!!']),
    # a word longer than max_length is cut mid-word at desired_length; so is a long word after short ones
    ('x' * 700, 200, 300, ['x' * 200] * 3 + ['x' * 100]),
    ('short words then ' + 'y' * 400 + ' end.', 200, 300,
     ['short words then ' + 'y' * 183, 'y' * 217 + ' end.']),
    # newlines are spaces (runs of whitespace become one space first): a newline is not a sentence end
    ('Line one\nline two.\n\n\nLine three', 1, 300, ['Line one line two.', 'Line three']),
    ('\u201cCurly quotes.\u201d she said. \u201cAgain!\u201d', 1, 300, ['"Curly quotes." she said.', '"Again!"']),
    ('First sentence. And a trailing part without a period', 1, 300,
     ['First sentence.', 'And a trailing part without a period']),
    # sentences are gathered until a part reaches desired_length
    ('One. Two. Three. Four.', 9, 300, ['One. Two.', 'Three. Four.']),
    # the look-ahead never sees the last character: a run of '!' takes it in
    ('Hi!xy', 1, 300, ['Hi!', 'xy']), ('Hi!x', 1, 300, ['Hi!x']),
    # nothing to say: empty, whitespace, punctuation only; a part of only quotes is kept
    ('', 200, 300, []), ('   \n\t ', 200, 300, []), ('... !!! ??? ,;:', 1, 300, []), ('""', 1, 300, ['""']),
])
def test_split_text_tricky_cases(text, desired, longest, parts):
    assert clvp.split_text(text, desired, longest) == parts


def test_split_text_parts_are_short_and_keep_every_word():
    parts = clvp.split_text(PARAGRAPH)
    assert len(PARAGRAPH) > 2000 and len(parts) >= 8
    assert all(len(p) <= 300 for p in parts) and all(p[-1] in '.!?"' for p in parts[:-1])
    assert " ".join(parts).split() == PARAGRAPH.split()
    assert parts[0].startswith("The lighthouse keeper") and parts[-1].endswith("the ship a fleet")


def test_split_text_refuses_what_it_cannot_split():
    for args in [(None,), ("text", 0, 300), ("text", 200, 0), ("text", 2.5, 300)]:
        with pytest.raises(clvp.InputError):
            clvp.split_text(*args)


def test_text_parts_cut_at_bars_when_the_text_has_one():
    assert clvp.text_parts(" First part. Still first! | second |  |third") == ["First part. Still first!", "second",
                                                                             "third"]
    assert clvp.text_parts("No bar. Two sentences.") == clvp.split_text("No bar. Two sentences.")
    assert clvp.text_parts("|||") == [] and clvp.text_parts("| ... |") == ["..."]


def json_results(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["results"]


def test_cli_a_long_text_is_ranked_part_by_part(tmp_path):
    r = cli("--random-init", "--tiny", "--text", PARAGRAPH, "--audio", VOICE, "--max-tokens", 8, "--candidates", 2,
            "--json", "--out", tmp_path / "best.npy")
    results, parts = json_results(r), clvp.split_text(PARAGRAPH)
    assert [x["text"] for x in results] == parts and len(parts) >= 8
    assert [x["line"] for x in results] == [1] * len(parts)
    assert [x["out"] for x in results] == clvp.output_paths(str(tmp_path / "best.npy"), len(parts))
    for x in results:
        assert np.load(x["out"]).tolist() == x["best"] and len(x["scores"]) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(f"best-{i + 1}.npy" for i in range(len(parts)))


def test_cli_bars_are_the_users_parts(capsys, tmp_path):
    text = "A first part, with a comma. And its second sentence! | The second part | | third?"
    code = clvp.main(["--random-init", "--tiny", "--text", text, "--audio", VOICE, "--max-tokens", "6",
                      "--candidates", "2", "--json", "--quiet", "--out", str(tmp_path / "b.npy")])
    results = json.loads(capsys.readouterr().out)["results"]
    assert code == 0 and [x["text"] for x in results] == ["A first part, with a comma. And its second sentence!",
                                                          "The second part", "third?"]
    assert [os.path.basename(x["out"]) for x in results] == ["b-1.npy", "b-2.npy", "b-3.npy"]


def test_cli_text_file_lines_are_each_split(capsys, tmp_path):
    lines = [PARAGRAPH[:700], "", "A short line.", "...", "Bars | cut this one", PARAGRAPH[700:1500]]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    code = clvp.main(["--random-init", "--tiny", "--text-file", str(tmp_path / "t.txt"), "--audio", VOICE,
                      "--max-tokens", "6", "--candidates", "2", "--batch-size", "6", "--json", "--quiet",
                      "--out", str(tmp_path / "b.npy")])
    results = json.loads(capsys.readouterr().out)["results"]
    split = [[(part, n + 1) for part in clvp.split_text(line)] for n, line in enumerate(lines)]
    expected = split[0] + split[2] + [("Bars", 5), ("cut this one", 5)] + split[5]     # line 4: nothing to say
    assert code == 0 and [(x["text"], x["line"]) for x in results] == expected
    assert len(split[0]) == 3 and len(split[5]) >= 3 and split[3] == []
    assert [x["decoded_with"] for x in results] == [3] * 9 + [1]            # parts of lines 3 and 5 together
    assert all(os.path.exists(x["out"]) for x in results) and len({x["out"] for x in results}) == len(expected)


def test_read_texts_gives_speak_py_the_parts_as_strings(tmp_path):
    args = clvp.build_parser().parse_args(["--text", PARAGRAPH, "--audio", VOICE])
    assert clvp.read_texts(args) == clvp.split_text(PARAGRAPH)
    assert all(type(t) is str for t in clvp.read_texts(args))


def parts(path):
    """A file's lines cut at its banners (a '# ====' line, then '# Part I...' or '# Appendix...') -> {title: lines}."""
    lines = open(path, encoding="utf-8").read().split("\n")
    starts = [i - 1 for i, line in enumerate(lines) if line.startswith(("# Part ", "# Appendix")) and
              lines[i - 1].startswith("# ====")]
    titles = [lines[i + 1][2:].split(":")[0] for i in starts]
    return dict(zip(titles, (lines[a:b] for a, b in zip(starts, starts[1:] + [len(lines)]))))


def long_functions(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 50]


def test_clvp_py_is_a_lesson_an_engine_the_boundaries_and_the_command_line():
    part = parts(os.path.join(HERE, "clvp.py"))
    assert list(part) == ["Part I", "Part II", "Part III", "Part IV", "Appendix to Part I"]
    lesson = "\n".join(part["Part I"])
    assert len(part["Part I"]) <= 950 and len(part["Part II"]) <= 300, {t: len(p) for t, p in part.items()}
    assert len(re.findall(r"^\s*raise\b", lesson, re.M)) <= 5
    assert not re.findall(r"torch\._|torch\.cpu\._|torch\.ops\.", lesson)     # no private torch API
    assert re.findall(r"torch\.ops\.mkldnn", "\n".join(part["Part II"]))        # the test can see one
    assert not long_functions(os.path.join(HERE, "clvp.py"))


def test_clvp_py_imports_only_the_standard_library_torch_numpy_scipy_soundfile():
    tree = ast.parse(open(os.path.join(HERE, "clvp.py"), encoding="utf-8").read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names - set(sys.stdlib_module_names) == {"torch", "numpy", "scipy", "soundfile"}


def test_a_full_run_loads_neither_the_converter_nor_transformers(tmp_path):
    # -X importtime lists every module the process imports, on stderr.
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(HERE, "clvp.py"), "--text", "Hi there.",
                        "--audio", VOICE, "--random-init", "--tiny", "--candidates", "2", "--max-tokens", "6",
                        "--explain", "--out", str(tmp_path / "b.npy")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "b.npy").exists(), r.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "soundfile" in imported                  # the listing is real
    assert not {m for m in imported if m.split(".")[0] in ("convert_weights", "bench", "transformers")}
