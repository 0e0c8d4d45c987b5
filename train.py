"""train.py: watch CLVP learn, and watch reranking pay off, in minutes on a CPU.

    python train.py                      # the default run (about 5 minutes on 2 cores), writes toy.pt
    python train.py --encoder-steps 60 --decoder-steps 60 --json     # a short run, its figures as JSON

The official weights cannot be fetched everywhere, and random weights score nothing. So this trains a
small CLVP on a toy speaker: a fixed, seeded process that "speaks" a sentence as speech tokens the way real
speech tokens behave (a run of codes per letter, a speaking rate, pauses, a few wrong codes), and a toy
recognizer that reads tokens back to letters.

Stage 1 trains the two CLVP encoders with CLIP's contrastive loss, as CLVP was trained, plus hard negatives
(each text also meets a rendering of itself with a word dropped, repeated or swapped), and measures retrieval
and those typical failures on held-out sentences. Stage 2 trains a
small decoder to speak like the toy speaker (teacher forcing through model.speech_logits), then runs the
real model.generate: 16 candidates per held-out sentence, ranked by the stage-1 encoders. The toy
recognizer's character error rate (CER) of a random candidate, of CLVP's choice and of the best of the 16
is Tortoise's claim in miniature: sampling many and reranking with CLVP beats taking one sample.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch

import clvp

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------
# The toy speaker and recognizer
#
# Real speech tokens (Tortoise's 8192 codes, about 21.5 per second) are not letters: one sound lasts
# several tokens, similar sounds share codes, the speaker's pace changes how long each sound lasts,
# silences sit between words, and the tokenizer of speech is noisy. The toy keeps each of those, in a
# small vocabulary of 512 codes, so that a model has something real to learn and a recognizer can score
# what a decoder says.
# ---------------------------------------------------------------------------------------------------

CHARS = "abcdefghijklmnopqrstuvwxyz ,.?!'-"
FAMILIES = ["aeiouy", "mn", "pbtdkgcq", "fvszxhj", "lrw", " ", ",.?!'-"]   # letters that sound alike
FAMILY = {ch: i for i, group in enumerate(FAMILIES) for ch in group}
SILENCE = clvp.FIX_STOP_CODE      # 83: Tortoise's own code for silence
ONSET = 100                       # code ONSET + i opens character i: each letter is heard starting
SUSTAIN = 200                     # codes SUSTAIN + 4f .. + 3 hold a sound of family f: shared, so ambiguous
CODES = 512                       # the toy's speech vocabulary; the start and stop tokens are 512 and 513
MEMORY = (1.5 * 2**30, 14 * 2**20)  # bytes: a run's peak is about [0] + [1] * --batch (measured: 1.2, 3.4 and
                                    # 8.4 GiB at --batch 32, 128 and 512, AMD EPYC, torch 2.13)


def speak(text, rng, noise=0.03):
    """Cleaned text -> speech codes (a list, without the stop token), about 20 per second of speech."""
    rate = rng.uniform(0.6, 1.5)                 # the speaker's pace, for this utterance
    codes = []
    for ch in text:
        if ch not in FAMILY:                     # what clean_text leaves that the toy cannot say
            continue
        codes.append(ONSET + CHARS.index(ch))   # a letter's own code opens it: letters can be told apart...
        if ch == " ":                            # ...pauses at word boundaries...
            codes += [SILENCE] * int(rng.integers(0, 2))
        elif FAMILY[ch] == 6:                    # ...longer ones at punctuation...
            codes += [SILENCE] * int(rng.integers(1, 4))
        else:                                    # ...and a run of 0-3 codes holds the sound, slower speakers
            hold = min(3, int(rng.exponential(0.7 * rate)))   # holding it longer; the family's codes are
            codes += [SUSTAIN + 4 * FAMILY[ch] + int(rng.integers(0, 4)) for _ in range(hold)]   # shared
    wrong = rng.random(len(codes)) < noise       # a few percent of codes come out wrong, as in real tokens
    for i in np.flatnonzero(wrong):
        codes[i] = int(rng.integers(ONSET, SUSTAIN + 4 * len(FAMILIES)))
    return codes


def recognize(codes):
    """Speech codes -> text: each opening code is a letter; every other code only holds a sound."""
    return "".join(CHARS[c - ONSET] for c in codes if ONSET <= c < ONSET + len(CHARS))


def cer(hypothesis, reference):
    """Character error rate: edit distance (insertions, deletions, substitutions) / reference length."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(reference), 1)


# ---------------------------------------------------------------------------------------------------
# Sentences: 2,000 for training and 200 held out, made by a small grammar (numbers included, so the
# cleaners have work), read through clvp's own cleaners and tokenizer
# ---------------------------------------------------------------------------------------------------

ADJECTIVES = "quiet red old small brave lazy bright cold young tall green happy".split()
NOUNS = "fox farmer cat sailor child robot miller baker dog teacher horse painter".split()
VERBS = "carries finds paints sells hides counts drops wants buys watches".split()
THINGS = "apples boxes letters stones candles shoes books lamps cups keys".split()
PLACES = "the mill|the river|the old bridge|town|the market|the hill|the station|the forest".split("|")


def sentences(n, seed=0):
    """n distinct sentences, the same every time: 'The brave fox carries 7 apples past the mill.'"""
    rng, seen = np.random.default_rng(seed), {}
    while len(seen) < n:
        pick = lambda words: words[int(rng.integers(len(words)))]
        count = int(rng.integers(2, 40))
        s = (f"The {pick(ADJECTIVES)} {pick(NOUNS)} {pick(VERBS)} {count} {pick(THINGS)} "
             f"{pick(['near', 'past', 'to', 'from'])} {pick(PLACES)}{pick(['.', '!', '?'])}")
        seen.setdefault(s, None)
    return list(seen)


def toy_config(max_text, max_speech):
    """A small CLVP with the official structure: 128 wide, 4 layers, a 512-code speech vocabulary."""
    enc = dict(dim=128, layers=4, heads=4, ff_dim=256, rotary_dim=32, projection_dim=128)
    return clvp.Config(
        clvp.DecoderConfig(dim=128, layers=4, heads=4, speech_vocab_size=CODES + 2, speech_positions=max_speech + 2,
                           start_token=CODES, stop_token=CODES + 1, text_positions=max_text + 3,
                           conditioning_blocks=2),
        clvp.EncoderConfig(vocab_size=256, **enc), clvp.EncoderConfig(vocab_size=CODES, **enc))


class Data:
    """The sentences, their ids, and a fresh toy rendering of any of them on demand."""

    def __init__(self, tokenizer, seed, held_out=200, train=2000):
        texts = sentences(train + held_out)
        self.texts = {"train": texts[:train], "held_out": texts[train:]}
        self.cleaned = {k: [clvp.clean_text(t) for t in v] for k, v in self.texts.items()}
        self.ids = {k: [tokenizer.encode(t) for t in v] for k, v in self.texts.items()}
        self.rng = np.random.default_rng(seed)
        self.max_text = max(len(i) for v in self.ids.values() for i in v)
        longest = max(len(c) for v in self.cleaned.values() for c in v)
        self.max_speech = 2 * longest + 16                # more than the slowest rendering

    def speech(self, text, stop, rng=None):
        """A rendering of cleaned text, stop token added, capped so it fits the model's positions. rng: the
        training stream by default; evaluation brings its own, so training longer draws the same held-out rows."""
        return speak(text, rng or self.rng)[:self.max_speech - 1] + [stop]


def pad(rows, value):
    """Lists of ids -> a LongTensor [B, longest], padded at the end with `value`."""
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (longest - len(r)) for r in rows])


# ---------------------------------------------------------------------------------------------------
# Stage 1: the two CLVP encoders, contrastive, on (text, toy speech) pairs
# ---------------------------------------------------------------------------------------------------

def speech_batch(model, rows):
    """Rendered speech rows (each ending in the stop token) -> what CLVP scores: stop-padded to the
    generation length and fixed, exactly as generate hands candidates to the speech encoder."""
    c = model.config.decoder
    tokens = pad(rows, c.stop_token)
    return clvp.fix_candidates(tokens, c.stop_token, pad_to=c.speech_positions - 2)[0]


def text_batch(model, rows):
    return pad(rows, model.config.decoder.text_stop_token)


def schedule(optimizer, step, steps, lr):
    """Linear warm-up over the first 10% of steps, then a cosine decay to a tenth."""
    warm = max(1, steps // 10)
    scale = step / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
    for group in optimizer.param_groups:
        group["lr"] = lr * scale


def train_encoders(model, data, steps, batch, log):
    """Stage 1 -> the loss of the first and the last tenth of the steps. Besides CLIP's in-batch negatives
    (the other sentences' speech), each text also meets a rendering of itself with one of Tortoise's
    typical failures (a word dropped, a word repeated, two words swapped): a hard negative, which a mean
    over codes cannot tell from the truth without learning counts and order."""
    params = [*model.text_encoder.parameters(), *model.speech_encoder.parameters(), model.logit_scale]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    stop, losses, start, tokens = model.config.decoder.stop_token, [], time.perf_counter(), 0
    for step in range(steps):
        pick = data.rng.choice(len(data.texts["train"]), batch, replace=False)
        text = text_batch(model, [data.ids["train"][i] for i in pick])
        wrong = [list(variants(data.cleaned["train"][i].split(" "), data.rng).values())[int(data.rng.integers(3))]
                 for i in pick]
        speech = speech_batch(model, [data.speech(data.cleaned["train"][i], stop) for i in pick] +
                              [data.speech(" ".join(words), stop) for words in wrong])          # [2B, T]
        schedule(optimizer, step, steps, 1e-3)
        sim = model.similarity(text, speech)                                   # [B, 2B]: true, then failures
        labels = torch.arange(batch)
        loss = (torch.nn.functional.cross_entropy(sim, labels) +
                torch.nn.functional.cross_entropy(sim[:, :batch].T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))   # CLIP's cap on the temperature
        losses.append(loss.item())
        tokens += text.numel() + speech.numel()
        if step % 25 == 0 or step == steps - 1:
            accuracy = (sim.argmax(dim=1) == labels).float().mean().item()     # among all 2B
            log(f"stage 1 step {step:4d}  loss {loss.item():.3f}  in-batch accuracy {accuracy:.2f}  "
                f"{tokens / (time.perf_counter() - start):,.0f} tokens/s")
    tenth = max(1, steps // 10)
    return float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))


def variants(words, rng):
    """Tortoise's typical failures of one sentence: a word dropped, a word repeated, two words swapped."""
    i = int(rng.integers(len(words)))
    j = (i + 1 + int(rng.integers(len(words) - 1))) % len(words)
    swapped = list(words)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    return {"dropped": words[:i] + words[i + 1:], "repeated": words[:i + 1] + words[i:], "swapped": swapped}


@torch.no_grad()
def evaluate_encoders(model, data, rng, count=200, pool=16):
    """Held-out top-1 retrieval of the true rendering among `pool` (the rest are other sentences'), and
    how often the true rendering beats each failure. Swapped words are where order matters: rotary
    attention can see them, a bag of tokens cannot (both orders hold the same codes)."""
    stop, texts, hits = model.config.decoder.stop_token, data.cleaned["held_out"][:count], 0
    wins = {"dropped": 0, "repeated": 0, "swapped": 0}
    true = speech_batch(model, [data.speech(t, stop, rng) for t in texts])
    features = model.speech_features(true)
    for k, text in enumerate(texts):
        t = model.text_features(torch.tensor([data.ids["held_out"][k]]))
        others = [j for j in rng.permutation(len(texts)) if j != k][:pool - 1]
        scores = model.score(t, features[[k] + others])[0]
        hits += int(scores.argmax() == 0)
        bad = variants(text.split(" "), rng)
        rows = speech_batch(model, [data.speech(" ".join(words), stop, rng) for words in bad.values()])
        worse = model.score(t, model.speech_features(rows))[0]
        for name, s in zip(bad, worse):
            wins[name] += int(scores[0] > s)
    return hits / len(texts), {name: w / len(texts) for name, w in wins.items()}


# ---------------------------------------------------------------------------------------------------
# Stage 2: a small decoder learns to speak like the toy speaker, in one fixed voice; then the real
# generate-and-rank, scored by the toy recognizer
# ---------------------------------------------------------------------------------------------------

VOICE = os.path.join(HERE, "examples", "voice.wav")          # the one fixed voice


def train_decoder(model, data, mels, steps, batch, log):
    """Stage 2: next-token cross-entropy through speech_logits, up to and including each stop token."""
    params = [*model.decoder.parameters(), *model.conditioning.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    c, losses, start, tokens = model.config.decoder, [], time.perf_counter(), 0
    for step in range(steps):
        pick = data.rng.choice(len(data.texts["train"]), batch, replace=False)
        text = text_batch(model, [data.ids["train"][i] for i in pick])
        speech = pad([data.speech(data.cleaned["train"][i], c.stop_token) for i in pick], c.stop_token)
        schedule(optimizer, step, steps, 2e-3)
        logits = model.speech_logits(mels, text, speech)[:, :-1]        # row s predicts speech[:, s]
        after_stop = (speech == c.stop_token).long().cumsum(dim=1) - (speech == c.stop_token).long() > 0
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), speech.masked_fill(after_stop, -100).flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens += (~after_stop).sum().item()
        if step % 25 == 0 or step == steps - 1:
            log(f"stage 2 step {step:4d}  loss {loss.item():.3f}  {tokens / (time.perf_counter() - start):,.0f} tokens/s")
    tenth = max(1, steps // 10)
    return float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))


def evaluate_reranking(model, data, mels, count, seed):
    """16 candidates per held-out sentence from the real generate -> mean CER of a random candidate,
    of CLVP's best, and of the best of the 16 (the oracle)."""
    options = clvp.DecodingOptions(num_candidates=16, batch_size=16, max_new_tokens=model.config.decoder.speech_positions - 2,
                                   temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=seed)
    random_, best, oracle = [], [], []
    for k in range(count):
        gen = model.generate(torch.tensor(data.ids["held_out"][k]), mels, options)
        errors = [cer(recognize(row[:n].tolist()), data.cleaned["held_out"][k])
                  for row, n in zip(gen.candidates, gen.lengths)]
        random_.append(np.mean(errors))
        best.append(errors[int(gen.order[0])])
        oracle.append(min(errors))
    return float(np.mean(random_)), float(np.mean(best)), float(np.mean(oracle))


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

def build_parser():
    p = clvp.ArgumentParser(prog="train.py", description="Train a tiny CLVP on a toy speaker and watch reranking "
                            "pay off.")
    p.add_argument("--encoder-steps", type=int, default=300, help="stage 1 steps (default 300)")
    p.add_argument("--decoder-steps", type=int, default=600, help="stage 2 steps (default 600)")
    p.add_argument("--batch", type=int, default=32, help="pairs per step (default 32)")
    p.add_argument("--eval", type=int, default=40, help="held-out sentences to generate for (default 40)")
    p.add_argument("--seed", type=int, default=0, help="makes the run repeatable on the CPU (default 0)")
    p.add_argument("--out", default="toy.pt", help="where to save the trained model (default toy.pt)")
    p.add_argument("--json", action="store_true", help="print the final figures as one JSON object")
    return p


def train(args):
    clvp.require([clvp.within("--encoder-steps", args.encoder_steps, 1, 100_000),
                  clvp.within("--decoder-steps", args.decoder_steps, 1, 100_000),
                  clvp.within("--batch", args.batch, 2, 512), clvp.within("--eval", args.eval, 1, 200),
                  clvp.within("--seed", args.seed, 0, 2**32 - 1)])
    with clvp.prefixed("--out "):
        clvp.check_output(args.out)           # never examples/voice.wav, data/ or the source
    need, free = MEMORY[0] + MEMORY[1] * args.batch, clvp.free_memory(torch.device("cpu"))
    clvp.require([(free is None or need <= 0.75 * free, f"--batch {args.batch} needs about {need / 2**30:.1f} GiB, "
                   f"more than 3/4 of the {(free or 0) / 2**30:.1f} GiB free: use a smaller --batch")])
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    log(f"--batch {args.batch}: this run needs about {need / 2**30:.1f} GiB of memory")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = clvp.Tokenizer.from_file(os.path.join(clvp.DATA, "tokenizer.json"))
    data = Data(tokenizer, args.seed)
    model = clvp.DecoderAndCLVP(toy_config(data.max_text, data.max_speech))
    model.tokenizer = tokenizer
    clvp.add_front_end(model)                                # the shipped mel norms
    log(f"{len(data.texts['train'])} training and {len(data.texts['held_out'])} held-out sentences, e.g. "
        f"{data.texts['train'][0]!r} -> {data.speech(data.cleaned['train'][0], CODES + 1)[:12]} ...")
    loss1 = train_encoders(model.train(), data, args.encoder_steps, args.batch, log)
    retrieval, hard = evaluate_encoders(model.eval(), data, np.random.default_rng([args.seed, 1]))
    log(f"held out: top-1 retrieval among 16 {retrieval:.3f} (chance 0.062); true above dropped word "
        f"{hard['dropped']:.3f}, repeated {hard['repeated']:.3f}, swapped {hard['swapped']:.3f}")
    mels = clvp.voice_mels(model, [VOICE])                  # [1, 80, frames]
    loss2 = train_decoder(model.train(), data, mels, args.decoder_steps, args.batch, log)
    cer_random, cer_best, cer_oracle = evaluate_reranking(model.eval(), data, mels, args.eval, args.seed)
    log(f"CER over {args.eval} held-out sentences, 16 candidates each: random candidate {cer_random:.3f}, "
        f"CLVP's best {cer_best:.3f}, best of 16 {cer_oracle:.3f}")
    clvp.save_checkpoint(args.out, model.config, model.state_dict(), tokenizer, model.mel_norms)
    figures = dict(retrieval_top1=retrieval, hard_negative_accuracy=hard, cer_random=cer_random,
                   cer_clvp_best=cer_best, cer_oracle_best=cer_oracle, steps=args.encoder_steps + args.decoder_steps,
                   seconds=round(time.perf_counter() - start, 1), stage1_loss=loss1, stage2_loss=loss2, out=args.out)
    log(f"saved {args.out} after {figures['seconds']} s; try: python clvp.py --checkpoint {args.out} --text "
        f"{data.texts['held_out'][0]!r} --audio examples/voice.wav --max-tokens {data.max_speech}")
    if args.json:
        print(json.dumps(figures))
    return 0


def main(argv=None):
    return clvp.run_command("train.py", lambda: train(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
