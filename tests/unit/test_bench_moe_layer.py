"""bench/moe_layer.py: a smoke run of its GPT-OSS shape (so the script cannot rot), which also holds our
block to transformers' `GptOssMLP` on the same weights: the script raises past its tolerance. It also
measures the CPU's instruction peak (bench/peak.py) and prints each row's target against it."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "moe_layer.py"


def test_gpt_oss_shape_runs_and_agrees_with_transformers():
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--shape", "gpt_oss", "--tokens", "1", "3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| gpt_oss |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["fp32", "1"], ["fp32", "3"], ["bf16", "1"], ["bf16", "3"]]
    peaks = re.findall(r"^(fp32|bf16): instruction peak ([\d,]+) GFLOP/s on 2 threads", run.stdout, re.MULTILINE)
    assert [name for name, _ in peaks] == ["fp32", "bf16"] and all(int(rate.replace(",", "")) > 0 for _, rate in peaks)
    # the target column: 1.5x transformers' best as GFLOP/s and its share of the peak, e.g. "12.4 (3%)"
    assert all(re.fullmatch(r"[\d.]+ \(\d+%\)", row.split(" | ")[9]) for row in rows)
