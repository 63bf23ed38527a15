"""The benchmark runs on CPU with random:test, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json

from vl2_jax.bench import main


def test_bench_smoke(capsys):
    assert main(["--model", "random:test", "--image-size", "112", "--new-tokens", "4", "--batches", "1,2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    metrics = {(r["metric"], r.get("prompt"), r.get("batch")) for r in rows}
    assert {("vision_ms", "image", None), ("prefill_ms", "image", None), ("ttft_ms", "text", None),
            ("decode_tokens_per_s", "image", 1), ("decode_tokens_per_s", "image", 2)} <= metrics
    assert all(r["value"] > 0 for r in rows)
    assert any(line.startswith("| random:test | decode_tokens_per_s") for line in out)
