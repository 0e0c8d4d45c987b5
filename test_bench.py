"""Tests for bench.py: it runs, through the real command line, and reports every row of its table. Timings
are printed, never asserted."""
import json
import os
import subprocess
import sys

import pytest

from conftest import FULL, run_case

HERE = os.path.dirname(os.path.abspath(__file__))


def bench(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *map(str, args)], capture_output=True,
                          text=True)


def test_fast_path_benchmark_reports_every_row():
    """bench.py --fast, tiny: first audio and the real-time factor for each way, the one-row step against its
    floor, HiFi-GAN alone; the figures are consistent with each other (their sizes are never asserted)."""
    r = bench("--fast", "--tiny", "--tokens", 8, "--repeat", 1, "--dtype", "float32", "bfloat16", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows, gbps = report["rows"], report["stream_GB_per_s"]
    for dtype in ("float32", "bfloat16"):
        for way in ("1 candidate", "16 candidates", "streamed"):
            row = rows[f"{way}, {dtype}"]
            assert row["audio s"] == 256 * int(int(4 * 8) * 24000 / 22050) / 24000      # 8 codes, never stopped
            assert 0 < row["first audio s"] <= row["wall s"] and row["real-time factor"] == row["wall s"] / row["audio s"]
        for engine in ("fast", "lesson"):
            step = rows[f"decode step at one row, {dtype}, {engine} engine"]
            assert abs(step["floor ms"] - step["weights MiB"] * 2**20 / gbps / 1e6) < 1e-9 and step["ms"] > 0
    assert rows["decode step at one row, float32, fast engine"]["weights MiB"] == \
        2 * rows["decode step at one row, bfloat16, fast engine"]["weights MiB"]
    alone = next(v for k, v in rows.items() if k.startswith("HiFi-GAN alone"))
    assert alone["speak.py fp32 s"] > 0 and alone["speak.py bf16 s"] > 0 and report["cpu"]["model"]
    assert bench("--fast", "--tiny", "--compare").returncode == 2


def test_tiny_benchmark_reports_every_row():
    r = bench("--tiny", "--candidates", 2, "--tokens", 6, "--repeat", 1, "--compare", "--dtype", "float32", "bfloat16",
              "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    names = list(report["results"])
    assert names[:2] == ["clvp.py float32", "clvp.py bfloat16"] and names[2].startswith("transformers 4.46.3 float32")
    for name, row in report["results"].items():
        for key in ("conditioning + prefill ms", "decode ms/step", "rerank ms", "end to end s", "peak memory MiB",
                    "candidate-tokens/s", "decode candidate-tokens/s"):
            assert row[key] >= 0, (name, key)
        assert row["steps"] == 5                                  # the stop token is banned: all 6 tokens
    fp32, bf16 = report["results"]["clvp.py float32"], report["results"]["clvp.py bfloat16"]
    assert fp32["bare matmul ms/step"] > 0 and fp32["decode / bare matmul"] > 0
    assert bf16["weights MiB read/step"] * 2 == fp32["weights MiB read/step"]      # half the bytes
    cache_bytes = {"float32": 4, "bfloat16": 2}[report["cache_dtype"]["bfloat16"]]     # the rule's, for this CPU
    assert bf16["KV cache MiB read/step"] * 4 == fp32["KV cache MiB read/step"] * cache_bytes > 0
    for row in (fp32, bf16):                                  # the floor: the bytes at the measured bandwidth
        floor = (row["weights MiB read/step"] + row["KV cache MiB read/step"]) * 2**20 / report["stream_GB_per_s"] / 1e6
        assert abs(row["floor ms/step"] - floor) < 1e-9 and row["decode / floor"] > 0
    assert report["stream_GB_per_s"] > 0 and report["cpu"]["capability"] and set(report["packed"]) == {"float32", "bfloat16"}
    assert set(report["ratios"]) == {f"{names[2]} / clvp.py float32", f"{names[2]} / clvp.py bfloat16",
                                     "clvp.py float32 / clvp.py bfloat16"}
    assert set(report["front ends"]) == {"tokenizer encode", "log-mel (6 s clip)"}
    table = bench("--tiny", "--candidates", 2, "--tokens", 4, "--repeat", 1)
    assert table.returncode == 0 and "decode / bare matmul" in table.stdout and "transformers" not in table.stdout
    assert "decode / floor" in table.stdout and "stream" in table.stdout and "capability" in table.stdout


def test_sentences_together_and_one_at_a_time():
    r = bench("--tiny", "--candidates", 2, "--tokens", 5, "--repeat", 1, "--sentences", 3, "--batch-size", 4, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert list(report["results"]) == ["clvp.py float32, 3 together", "clvp.py float32, one at a time"]
    together, alone = report["results"].values()
    assert together["KV cache MiB read/step"] == 2 * alone["KV cache MiB read/step"]   # 4 rows against 2
    for row in (together, alone):
        assert row["candidate-tokens/s"] > 0 and row["end to end s"] > 0 and "decode ms/step" not in row
    assert list(report["ratios"]) == ["clvp.py float32, one at a time / clvp.py float32, 3 together"]


def test_attention_choices():
    r = bench("--tiny", "--candidates", 3, "--attention")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert list(report) == ["100 positions", "500 positions"]
    for ways in report.values():
        assert len(ways) == 5 and all(ms > 0 for ms in ways.values()) and "fp32 cache, fp32 SDPA" in ways
        assert "bf16 shared-prompt cache, StepCache.attend" in ways


def test_bad_arguments_are_one_line():
    for args, words in ((["--tokens", 1], "--tokens"), (["--repeat", 0], "--repeat"), (["--device", "tpu9"], "device"),
                        (["--candidates", "x"], "invalid int"),
                        (["--sentences", 0], "--sentences"), (["--dtype", "float32", "float32"], "each dtype once")):
        code, _, err, _, _ = run_case(HERE, "bench.py", args)            # the parser and the checks: in-process
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err


@FULL
@pytest.mark.xdist_group("bench --speak")      # a worker of its own: 131 s on a Xeon with AMX, 14 min on AVX2
def test_speak_rows_against_the_original(tortoise_src):
    """--speak --compare builds the original DiffusionTts and UnivNet holding speak.py's weights (it refuses
    if any tensor does not load) and reports each row for both; the original's sampler row is its pass x 30."""
    env = dict(os.environ, CLVP_TORTOISE_SRC=str(tortoise_src))
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--speak", "--compare", "--seconds", "1",
                        "--repeat", "1", "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = report["rows"]
    assert report["frames"] == 93 and report["real_time_factor_ultra_fast"] > 0
    assert set(report["peak_mib_above_the_models"]) == {"speak.py", "original"}
    assert all(mib > 0 for mib in report["peak_mib_above_the_models"].values())
    for name in ("one network pass", "guided step (conditioned + free)", "vocoder",
                 "ultra_fast, 30 steps (original: 30 x one pass)"):
        assert rows[name]["speak.py s"] > 0 and rows[name]["original s"] > 0, name
    assert rows["ultra_fast, 30 steps (original: 30 x one pass)"]["original s"] == \
        30 * rows["one network pass"]["original s"]
    assert rows["ddim, 10 steps"]["speak.py s"] > 0 and "original s" not in rows["ddim, 10 steps"]
    for name in ("one network pass, bf16 (original: fp32)", "vocoder, bf16 (original: fp32)",
                 "ultra_fast, 30 steps, bf16 (original: fp32, 30 x one pass)"):
        assert rows[name]["speak.py s"] > 0 and rows[name]["original s"] > 0, name


def test_load_reports_time_and_peak_memory(tmp_path):
    code, out, err, _, _ = run_case(tmp_path, "bench.py", ["--load", "--tiny", "--repeat", "2", "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["runs"] == 2 and report["load s"] > 0 and report["peak memory MiB"] >= 0
    assert report["file MiB"] >= report["weights MiB"] >= 0 and report["cpu"]["model"]
