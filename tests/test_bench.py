"""The benchmark runs on CPU with random:test, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json

from vl2_jax.bench import main
from vl2_jax.config import PRESETS, Runtime


def test_bench_smoke(capsys):
    assert main(["--model", "random:test", "--image-size", "112", "--new-tokens", "4", "--batches", "1,2",
                 "--repeats", "1", "--decode-steps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    metrics = {(r["metric"], r.get("prompt"), r.get("batch")) for r in rows}
    assert {("warmup_s", None, None), ("vision_ms", "image", None), ("ttft_ms", "text", None),
            ("ttft_ms", "image", None), ("ttft_new_prompts_ms", None, None),
            ("decode_tokens_per_s", "image", 1), ("decode_tokens_per_s", "image", 2)} <= metrics
    assert all(r["value"] > 0 for r in rows)
    assert all(r["decode_steps"] == 2 for r in rows)
    new = next(r for r in rows if r["metric"] == "ttft_new_prompts_ms")
    assert new["compilations"] == 0 and new["prompts"] >= 6 and 0 < new["p50"] <= new["p90"]
    assert len(set(new["prompt_tokens"])) >= 6  # different prompts, not one repeated
    assert all(r["compilations"] == 0 for r in rows if r["metric"] == "decode_tokens_per_s")
    lc = PRESETS["test"].language
    moe_layers = sum(lc.is_moe_layer(i) for i in range(lc.num_hidden_layers))
    balance = {r["prompt"]: r for r in rows if r["metric"] == "moe_busiest_expert_tokens"}
    assert set(balance) == {"image", "text"}
    for r in balance.values():
        assert len(r["per_layer"]) == moe_layers and r["value"] == max(r["per_layer"]) <= r["prompt_tokens"]
    assert any(line.startswith("| random:test | decode_tokens_per_s") for line in out)
    assert all(r["kernels"] == [] for r in rows)  # CPU: the portable paths only
    assert not any("floor_ms" in r for r in rows)  # no bandwidth floor off the GPU
    assert not any(r["metric"] == "decode_launches_per_token" for r in rows)  # (a CPU trace names no kernels)


def test_decode_launches_are_a_long_answers_kernels_less_a_one_token_answers(monkeypatch):
    """Per decode step: the kernels of a 5-token answer less those of a 1-token one (the same prefill),
    over the steps it ran: 4 in calls of 2 or 4 steps, 6 in calls of 3 (a call runs to its end); the
    wall time is the answer's decode time over those steps. A trace without kernels gives no row."""
    import collections

    from vl2_jax import traces
    from vl2_jax.bench import decode_launches
    from vl2_jax.load import load_model

    model = load_model("random:test", runtime=Runtime(max_batch=1, max_seq_len=64))
    batch = model.processor.batchify([model.processor([{"role": "user", "content": "Hi"}])])
    one = ({"prefill": 3, "sample": 2}, {"prefill": 300, "sample": 20})
    five = ({"prefill": 3, "sample": 2 + 4, "matvec": 4 * 10, "norm": 4 * 5},
            {"prefill": 310, "sample": 60, "matvec": 4000, "norm": 400})
    traced = iter([one, five, one, five, one, five, ({}, {}), ({}, {})])

    def fake(fn, *args, **kwargs):
        launches, busy = next(traced)
        return fn(), 0.0, collections.Counter(launches), collections.Counter(busy)

    monkeypatch.setattr(traces, "traced", fake)
    for per_call, steps in [(2, 4), (4, 4), (3, 6)]:
        row = decode_launches(model, batch, 5, per_call)
        assert row["metric"] == "decode_launches_per_token" and row["batch"] == 1 and row["decode_steps_run"] == steps
        assert row["value"] == (4 + 40 + 20) / steps
        assert abs(row["device_busy_ms"] - 1e-3 * (10 + 40 + 4000 + 400) / steps) < 1e-12
        assert row["wall_ms"] > 0
    assert decode_launches(model, batch, 5, 4) is None


def test_every_line_names_the_kernels_in_use(monkeypatch):
    """With the GPU kernels faked usable, the tiny preset lists them all; with `Runtime(kernels=False)`, none."""
    import jax.numpy as jnp

    from vl2_jax import kernels
    from vl2_jax.bench import active_kernels
    from vl2_jax.modules import attention

    for name in ("mosaic_ragged_usable", "gathered_matvec_usable", "expert_matmul_usable"):
        monkeypatch.setattr(kernels, name, lambda *a: True)
    lc = PRESETS["tiny"].language
    assert active_kernels(lc, jnp.bfloat16, Runtime()) == ["prefill: grouped matmul (Mosaic)", "decode: gathered matvec",
                                                           "decode batches: expert matmul"]
    monkeypatch.setattr(attention, "decode_attention_usable", lambda *a: True)
    assert active_kernels(lc, jnp.bfloat16, Runtime())[-1] == "decode: attention (Triton)"
    assert "decode: attention (Triton)" not in active_kernels(lc, jnp.bfloat16, Runtime(attention="plain"))
    monkeypatch.setattr(attention, "decode_attention_usable", lambda *a: False)
    assert active_kernels(lc, jnp.bfloat16, Runtime(kernels=False)) == []
    # quantized experts: the decode kernels' own self-check on int8 values decides (here: it fails)
    monkeypatch.setattr(kernels, "gathered_matvec_usable", lambda *a, weight_dtype=None: weight_dtype is None)
    monkeypatch.setattr(kernels, "expert_matmul_usable", lambda *a, weight_dtype=None, **kw: weight_dtype is None)
    assert active_kernels(lc, jnp.bfloat16, Runtime(), jnp.int8) == ["prefill: grouped matmul (Mosaic)"]
    # ... and quantized prefill takes the blocked kernel where it runs, in place of the grouped matmul
    monkeypatch.setattr(kernels, "blocked_matmul_usable", lambda *a, weight_dtype=None: weight_dtype is not None)
    assert active_kernels(lc, jnp.bfloat16, Runtime(), jnp.int8) == ["prefill: blocked matmul (Triton)"]
    assert active_kernels(lc, jnp.bfloat16, Runtime())[0] == "prefill: grouped matmul (Mosaic)"


def test_the_byte_floor_counts_quantized_weights_as_stored():
    """A batch-1 step's bytes: int8 values (1 byte) and their float32 scales, the chosen experts only."""
    import vl2_jax
    from vl2_jax.bench import activated_bytes

    plain = vl2_jax.load_model("random:test", "float32")
    int8 = vl2_jax.load_model("random:test", "float32", quant="int8")
    # every quantized weight's read shrinks from 4 bytes to 1 plus its scales: below half the float bytes
    assert 0.5 * activated_bytes(plain, 0) > activated_bytes(int8, 0) > 0
    # the KV cache stays in the model dtype
    assert activated_bytes(int8, 10) - activated_bytes(int8, 0) == activated_bytes(plain, 10) - activated_bytes(plain, 0)


def test_activated_parameters_count_one_embedding_row_and_the_chosen_experts():
    """What one token uses: the chosen top-k of E routed experts in a MoE layer only, all of a dense
    layer's MLP and of every other leaf, `embed_rows` rows of the embedding; quantized leaves as stored."""
    import dataclasses

    import numpy as np

    from vl2_jax.bench import activated_parameters
    from vl2_jax.config import PRESETS

    lc = dataclasses.replace(PRESETS["test"].language, hidden_size=4, n_routed_experts=8, num_experts_per_tok=2,
                             first_k_dense_replace=1, moe_layer_freq=1)
    language = {"embed": np.zeros((100, 4), np.float32),
                "layers_0": {"mlp": {"gate_up_w": np.zeros((4, 2, 3), np.float32)}},
                "layers_1": {"mlp": {"gate_up_w": {"qvalue": np.zeros((8, 4, 2, 3), np.int8),
                                                   "scale": np.zeros((8, 1, 2, 3), np.float32)},
                                     "down_w": np.zeros((8, 3, 4), np.float32),
                                     "router_w": np.zeros((4, 8), np.float32)}}}
    counts = activated_parameters(lc, language)
    assert sorted(counts) == sorted([(4, 4), (24, 4), (8 * 24 // 4, 1), (8 * 6 // 4, 4), (8 * 12 // 4, 4), (32, 4)])
    assert (0, 4) in activated_parameters(lc, language, embed_rows=0)


def test_missing_model_is_one_error_line(capsys):
    assert main(["--model", "/nonexistent", "--batches", "1"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "/nonexistent" in errors[0] and "Traceback" not in err


def test_a_slot_too_short_for_the_prompts_is_refused_before_warming_up(capsys):
    assert main(["--model", "random:test", "--image-size", "112", "--new-tokens", "8", "--batches", "1",
                 "--max-seq-len", "64"]) == 1
    err = capsys.readouterr().err
    need = int(err.split("pass --max-seq-len ")[1].split()[0])
    assert "error: --max-seq-len 64 is too short for the benchmark" in err and need > 64 and "warmup" not in err, err
    assert main(["--model", "random:test", "--image-size", "112", "--new-tokens", "8", "--batches", "1",
                 "--repeats", "1", "--max-seq-len", str(need)]) == 0  # (and that many is enough)


def test_one_new_token_or_a_negative_bandwidth_is_refused_by_the_parser(capsys):
    import pytest

    for flag, value in (("--new-tokens", "1"), ("--hbm-gbps", "-5"), ("--hbm-gbps", "nan")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", "random:test", flag, value])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_table_values_have_units():
    from vl2_jax.bench import table

    rows = [{"model": "m", "metric": m, "value": 1.0} for m in
            ("warmup_s", "kv_cache_gb", "vision_ms", "ttft_ms", "decode_tokens_per_s", "moe_busiest_expert_tokens",
             "peak_memory_gb")]
    lines = table(rows).splitlines()
    assert lines[0].split("|")[5].strip() == "unit"
    assert [line.split("|")[5].strip() for line in lines[2:]] == ["s", "GB", "ms", "ms", "tok/s", "tokens", "GB"]


def test_sigterm_during_warmup_ends_at_once_without_waiting_for_compiles_under_way():
    """SIGTERM (or Ctrl-C) while the benchmark warms up: "interrupted" and exit status 130, leaving at
    once; the compiles already under way on the warmup's threads are not waited for (Python's own exit
    joined them, which printed their progress lines after "interrupted": half a minute on a GPU)."""
    from tests.conftest import sigterm_when

    code, seen, rest = sigterm_when(["-m", "vl2_jax.bench", "--model", "random:test", "--batches", "1,2",
                                     "--repeats", "1"], ready="warmup 1/")
    assert code == 130, seen + rest
    after = rest.split("interrupted\n", 1)
    assert len(after) == 2 and after[1] == "" and "Traceback" not in rest, rest
