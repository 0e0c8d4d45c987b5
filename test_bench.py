"""Tests for bench.py: it runs, through the real command line, and reports every row of its table. Timings
are printed, never asserted."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def bench(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), *map(str, args)], capture_output=True,
                          text=True)


def test_tiny_benchmark_reports_every_row():
    r = bench("--tiny", "--candidates", 2, "--tokens", 6, "--repeat", 1, "--compare", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ours, theirs = report["results"]["clvp.py"], report["results"]["transformers"]
    for row in ("conditioning + prefill ms", "decode ms/step", "rerank ms", "end to end s", "peak memory MiB",
                "candidate-tokens/s"):
        assert ours[row] >= 0 and theirs[row] >= 0, row
    assert ours["steps"] == theirs["steps"] == 5                  # the stop token is banned: all 6 tokens
    assert ours["bare matmul ms/step"] > 0 and ours["decode / bare matmul"] > 0
    assert set(report["front ends"]) == {"tokenizer encode", "log-mel (6 s clip)"}
    table = bench("--tiny", "--candidates", 2, "--tokens", 4, "--repeat", 1)
    assert table.returncode == 0 and "decode / bare matmul" in table.stdout and "transformers" not in table.stdout


def test_bad_arguments_are_one_line():
    for args, words in ((["--tokens", 1], "--tokens"), (["--repeat", 0], "--repeat"), (["--device", "tpu9"], "device"),
                        (["--candidates", "x"], "invalid int")):
        r = bench(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr
