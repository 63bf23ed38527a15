"""The benchmark runs on CPU with random:test, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json

from vl2_jax.bench import main
from vl2_jax.config import PRESETS


def test_bench_smoke(capsys):
    assert main(["--model", "random:test", "--image-size", "112", "--new-tokens", "4", "--batches", "1,2",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    metrics = {(r["metric"], r.get("prompt"), r.get("batch")) for r in rows}
    assert {("vision_ms", "image", None), ("prefill_ms", "image", None), ("ttft_ms", "text", None),
            ("decode_tokens_per_s", "image", 1), ("decode_tokens_per_s", "image", 2)} <= metrics
    assert all(r["value"] > 0 for r in rows if r["metric"] != "moe_layers_over_capacity")
    over = [r for r in rows if r["metric"] == "moe_layers_over_capacity"]
    assert {r["prompt"] for r in over} == {"image", "text"}
    lc = PRESETS["test"].language
    moe_layers = sum(lc.is_moe_layer(i) for i in range(lc.num_hidden_layers))
    for r in over:  # per MoE layer, the busiest expert gets at most every (bucketed) token
        busiest = r["busiest_expert_tokens"]
        assert len(busiest) == moe_layers and all(0 < n <= r["bucket_tokens"] for n in busiest)
        assert r["value"] == sum(n > r["capacity"] for n in busiest)
    assert any(line.startswith("| random:test | decode_tokens_per_s") for line in out)
