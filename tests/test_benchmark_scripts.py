"""The GPU benchmark scripts stay runnable between GPU sessions: each imports and answers --help, and the
MoE dispatch benchmark runs end to end at the test model's size on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(script):
    r = _run(str(script), "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_load_speed_measures_a_converted_fixture(tmp_path):
    fixture = ROOT.parent / "shared" / "fixtures" / "mla" / "ckpt"
    r = _run("-m", "convert", str(fixture), str(tmp_path / "ckpt"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("benchmarks/load_speed.py", str(tmp_path / "ckpt"), "--repeats", "1", "--evict", "fadvise",
             "--readers", "orbax")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["metric"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"plain_read", "plain_read_parallel", "load_model", "restore_orbax", "summary"}
    assert rows["load_model"]["cache"] == "fadvise_dontneed" and rows["load_model"]["gb_per_s"] > 0
    assert rows["load_model"]["weights_gb"] == rows["restore_orbax"]["weights_gb"] > 0
    assert rows["plain_read"]["file_gb"] == rows["load_model"]["file_gb"] > 0


@pytest.mark.slow  # (a GPU benchmark script's CPU smoke run, 14-33 s: out of CI's time)
def test_moe_dispatch_benchmark_runs_on_cpu():
    r = _run("benchmarks/moe_dispatch.py", "--models", "test", "--tokens", "1,8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| test | gather |" in r.stdout and "| test | grouped |" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--kernel", "matvec", "--block-m", "64"], "--block-m go with --kernel ragged"),
    (["--kernel", "ragged", "--dense"], "--dense and --weights go with --kernel matvec"),
    (["--kernel", "blocked", "--block-k", "64"], "--block-k do not go with --kernel blocked"),
    ([], "--kernel"),
])
def test_tile_sweep_refuses_options_of_the_other_kernel(args, message):
    r = _run("benchmarks/tile_sweep.py", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # (a GPU benchmark script's CPU smoke run, 14-33 s: out of CI's time)
@pytest.mark.parametrize("same_weights", [False, True])
def test_bf16_drift_runs_on_cpu(same_weights):
    extra = ["--same-weights"] if same_weights else []
    r = _run("benchmarks/bf16_drift.py", "jax", "--model", "test", "--layers", "2", "--tokens", "16", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "logits_cosine_bf16_with_f32_routing" in r.stdout and "tokens_with_other_experts" in r.stdout
    assert f"reference_weights={'bf16' if same_weights else 'float32'}" in r.stdout


@pytest.mark.slow  # (a GPU benchmark script's CPU smoke run, 14-33 s: out of CI's time)
def test_cosine_on_the_same_weights_runs_on_cpu():
    r = _run("benchmarks/profile_decode.py", "--model", "random:test", "--cosine", "--no-profile", "--same-weights",
             "--forced-routing")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metric=bf16_vs_f32_logits_cosine | reference_weights=bf16" in r.stdout
    assert "metric=bf16_with_f32_routing_vs_f32_logits_cosine | reference_weights=bf16" in r.stdout


def test_torch_drift_refuses_presets_transformers_does_not_implement():
    r = _run("benchmarks/bf16_drift.py", "torch", "--model", "tiny")
    assert r.returncode == 2 and "use_mla=False" in r.stderr, r.stderr[-2000:]


def test_torch_drift_without_torch_says_so():
    try:
        import torch  # noqa: F401
    except ImportError:
        r = _run("benchmarks/bf16_drift.py", "torch", "--model", "test")
        assert r.returncode == 2 and "needs torch" in r.stderr, r.stderr[-2000:]
    else:
        pytest.skip("torch is installed here")


@pytest.mark.parametrize("routing", ["preset", "base"])
@pytest.mark.parametrize("mode", [[], ["--layerwise"]], ids=["whole", "layerwise"])
def test_torch_drift_float32_agrees_with_pytorch(mode, routing):
    """Where torch is installed: vl2-jax's float32 language model against transformers' on the same
    weights (MLA with a query LoRA), through the checkpoint conversion rules: DeepseekV2 with the test
    preset's grouped softmax routing, DeepseekV3 with base's sigmoid `noaux_tc` routing (on the test
    preset's 4 groups, 2 kept) and a random correction bias. It checks the script's renaming of
    transformers' tensors (a swapped gate and up, reordered experts or a negated correction bias fail
    it), not the norms' mapping (every norm scale is 1 in this draw; the fixtures' parity tests cover the
    conversion rules themselves)."""
    pytest.importorskip("torch")
    r = _run("benchmarks/bf16_drift.py", "torch", "--model", "test", "--tokens", "32", "--routing", routing, *mode)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    cross = next(row for row in rows if row["metric"] == "jax_f32_vs_torch_f32_logits_cosine")
    assert cross["min"] > 0.999999 and cross["argmax_agreement"] == 1.0
    assert any(row["metric"] == "torch_tokens_with_other_experts" for row in rows)


def test_router_margins_of_the_torch_drift_script():
    """The float32 parting report's margin: the k-th best choice score less the next one's, from softmax
    scores (small) or sigmoid scores plus the correction bias (base), whatever the experts' order."""
    import importlib.util

    import numpy as np

    from vl2_jax.config import PRESETS

    spec = importlib.util.spec_from_file_location("bf16_drift", ROOT / "benchmarks" / "bf16_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    probs = np.array([0.2, 0.15, 0.1, 0.09, 0.08, 0.07, 0.05] + [0.26 / 57] * 57)  # small: 64 experts, top 6
    order = rng.permutation(64)
    got = module.router_margins(PRESETS["small"].language, np.log(probs[order])[None] + 3.0)
    np.testing.assert_allclose(got, [0.07 - 0.05], rtol=1e-6)
    bias = rng.permutation(np.arange(72) * 1e-3)  # base: 72 experts, top 6; equal logits, the bias ranks them
    got = module.router_margins(PRESETS["base"].language, np.zeros((2, 72)), bias)
    np.testing.assert_allclose(got, [1e-3, 1e-3], rtol=1e-6)
    assert module.router_margins(PRESETS["base"].language, np.zeros((1, 72)))[0] == 0.0  # all tied


def test_idle_gaps_of_a_kernel_timeline():
    """The profiles' gap finder: overlapping kernels count once, gaps are ranked with their
    neighbours, the span runs from the first start to the last end."""
    from vl2_jax.traces import idle_gaps

    # us: a [0, 100), b [50, 120) overlapping a, c [400, 450), d [460, 500)
    timeline = [(400.0, 50.0, "c"), (0.0, 100.0, "a"), (50.0, 70.0, "b"), (460.0, 40.0, "d")]
    got = idle_gaps(timeline, top=1)
    assert got["span_ms"] == 0.5 and abs(got["idle_ms"] - 0.29) < 1e-9
    assert got["largest_gaps"] == [{"ms": 0.28, "after": "b", "before": "c"}]


def test_read_trace_counts_the_gpu_streams_kernels(tmp_path):
    """A trace's kernels are the complete events on a GPU's stream threads, by name without the numeric
    suffix and by program; host threads and other devices' events do not count."""
    import gzip

    from vl2_jax.traces import read_trace

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python"}}]
    kernel = lambda name, ts, dur, module: {"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": ts, "dur": dur,
                                            "args": {"hlo_module": module}}
    events = [kernel("input_reduce_fusion_3", 0, 5, "jit_decode(12)"), kernel("input_reduce_fusion.7", 10, 7, "jit_decode(12)"),
              kernel("gemm_fusion_dot", 20, 30, "jit_prefill(3)"),
              {"ph": "X", "pid": 2, "tid": 1, "name": "input_reduce_fusion_3", "ts": 0, "dur": 99},  # (the host's)
              {"ph": "i", "pid": 1, "tid": 7, "name": "marker", "ts": 1}]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    intervals = []
    launches, busy, programs = read_trace(str(path), intervals=intervals)
    assert launches == {"input_reduce_fusion": 2, "gemm_fusion_dot": 1}
    assert busy == {"input_reduce_fusion": 12, "gemm_fusion_dot": 30}
    assert programs == {"jit_decode": 12, "jit_prefill": 30}
    assert sorted(intervals)[0] == (0.0, 5.0, "input_reduce_fusion", "jit_decode")
    exact, _, _ = read_trace(str(path), exact_names=True)
    assert exact == {"input_reduce_fusion_3": 1, "input_reduce_fusion.7": 1, "gemm_fusion_dot": 1}


@pytest.mark.parametrize("mode", ["default", "readonly"])
def test_load_profile_times_every_leaf(tmp_path, mode):
    fixture = ROOT.parent / "shared" / "fixtures" / "mla" / "ckpt"
    assert _run("-m", "convert", str(fixture), str(tmp_path / "ckpt")).returncode == 0
    r = _run("benchmarks/load_profile.py", str(tmp_path / "ckpt"), "--mode", mode)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.splitlines()[-1])
    assert row["leaves"] > 10 and row["weights_gb"] >= 0 and row["wall_s"] > 0
    assert (row["place_s_summed"] > 0) == (mode == "default") and row["read_s_summed"] > 0


def test_alone_vs_together_finds_float32_answers_identical():
    r = _run("benchmarks/alone_vs_together.py", "--model", "random:test", "--dtype", "float32", "--requests", "4",
             "--new-tokens", "6", "--max-batch", "2", "--max-seq-len", "512")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.splitlines()[-1])
    assert row["identical"] == 4 and row["first_difference"] == [None] * 4


@pytest.mark.slow  # (a GPU benchmark script's CPU smoke run, 14-33 s: out of CI's time)
def test_finetune_speed_runs_on_cpu():
    r = _run("benchmarks/finetune_speed.py", "--model", "random:test", "--dtype", "float32", "--full", "--batch", "1",
             "--seq-len", "512", "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.splitlines()[0])
    assert row["moe"] == "blocked" and row["tokens_per_s"] > 0 and row["model_tflops_per_step"] > 0
    assert "mfu" not in row  # no bf16 peak on a CPU
    short = _run("benchmarks/finetune_speed.py", "--model", "random:test", "--seq-len", "64", "--steps", "1")
    assert short.returncode != 0 and "--seq-len 64 is too short" in short.stderr



def test_cli_timeline_stamps_a_fresh_generate():
    r = _run("benchmarks/cli_timeline.py", "--repeats", "1", "--", "--model", "random:test", "--prompt", "hi",
             "--max-new-tokens", "4", "--compile-cache", "")
    assert r.returncode == 0, r.stderr[-2000:]
    run, summary = (json.loads(line) for line in r.stdout.splitlines())
    assert summary["ok"] == 1 and run["returncode"] == 0
    assert any("model ready" in text for _, text in run["lines"])
    assert 0 < run["load_s"] < run["answered_s"] <= run["wall_s"] and run["exit_s"] >= 0


@pytest.mark.slow
def test_serve_ab_compares_two_checkouts_on_cpu(tmp_path):
    """Two servers of this checkout (A and B), one round at concurrency 1: every field of both, ratios."""
    r = subprocess.run([sys.executable, "benchmarks/serve_ab.py", "--a", ".", "--b", ".", "--cpu", "--rounds", "1",
                        "--max-batch", "2", "--concurrency", "1", "--requests", "2", "--min-tokens", "4",
                        "--max-tokens", "8", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(row["side"], row["concurrency"], row["errors"]) for row in rows] == [("a", 1, 0), ("b", 1, 0)]
    assert all(row["output_tokens_per_s"] > 0 for row in rows)
    assert "| 1 | " in r.stdout
    (tmp_path / "rows.jsonl").write_text(r.stdout)
    table = subprocess.run([sys.executable, "benchmarks/serve_ab.py", "--table", str(tmp_path / "rows.jsonl")],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert table.returncode == 0 and [line for line in table.stdout.splitlines() if line.startswith("| 1 | ")] == [
        line for line in r.stdout.splitlines() if line.startswith("| 1 | ")]


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_hlo_traffic_finds_the_widened_weights_of_a_decode_program(quant, tmp_path):
    # On a CPU every quantized product widens its weight to float32 first (no kernels there): the
    # script must find those copies in the compiled decode program, and none in a float model's.
    r = _run("benchmarks/hlo_traffic.py", "--model", "random:test", "--quant", quant, "--min-elements", "1000",
             "--save", str(tmp_path / "decode.hlo.gz"))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.splitlines()[0])
    assert summary["ops"] > 50 and summary["written_bytes"] > 0
    widened = summary["widened"]
    if quant == "none":
        assert widened == []
    else:
        assert len(widened) >= 8 and all(w["widens"].startswith("s8[") for w in widened)
        assert any("attn" in w["source"] for w in widened) and any("mlp" in w["source"] for w in widened)
        assert "| reads layers_*/attn/" in r.stdout  # (a dot without metadata, named by the weight it reads)
    again = _run("benchmarks/hlo_traffic.py", "--hlo", str(tmp_path / "decode.hlo.gz"), "--min-elements", "1000")
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[0])["widened"] == widened
    if quant == "int8":  # another program by its engine name
        prefill = _run("benchmarks/hlo_traffic.py", "--model", "random:test", "--quant", quant, "--min-elements",
                       "1000", "--program", "prefill(1, 128)")
        assert prefill.returncode == 0, prefill.stderr[-2000:]
        summary = json.loads(prefill.stdout.splitlines()[0])
        assert summary["program"].endswith("prefill(1, 128)") and any("mlp" in w["source"] for w in summary["widened"])


def test_hlo_traffic_reads_gpu_forms_of_the_text():
    """On a GPU's text: a cuBLAS call's workspace is not data, an async pair counts once, a GEMM fusion
    that converts int8 inside reads it in place (not widened), a gather converted to bf16 is widened."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hlo_traffic", ROOT / "benchmarks" / "hlo_traffic.py")
    hlo = sys.modules["hlo_traffic"] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up)
    spec.loader.exec_module(hlo)
    text = """HloModule m

%gemm (p.0: bf16[4,2048], p.1: s8[2048,4096]) -> bf16[4,4096] {
  %p.0 = bf16[4,2048]{1,0} parameter(0)
  %p.1 = s8[2048,4096]{1,0} parameter(1)
  %c.0 = bf16[2048,4096]{1,0} convert(%p.1)
  ROOT %d.0 = bf16[4,4096]{1,0} dot(%p.0, %c.0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%take (q.0: s8[64,2048,512], q.1: s32[6,1]) -> bf16[6,2048,512] {
  %q.0 = s8[64,2048,512]{2,1,0} parameter(0)
  %q.1 = s32[6,1]{1,0} parameter(1)
  %g.0 = s8[6,2048,512]{2,1,0} gather(%q.0, %q.1), offset_dims={1,2}, slice_sizes={1,2048,512}
  ROOT %c.1 = bf16[6,2048,512]{2,1,0} convert(%g.0), metadata={op_name="jit(decode)/while/body/closed_call/LanguageModel.decode/layers_3/mlp/gather"}
}

ENTRY %main (a: bf16[4,2048], w: s8[2048,4096], e: s8[64,2048,512], i: s32[6,1], x: bf16[2048,2048]) -> bf16[4,4096] {
  %a = bf16[4,2048]{1,0} parameter(0)
  %w = s8[2048,4096]{1,0} parameter(1)
  %e = s8[64,2048,512]{2,1,0} parameter(2)
  %i = s32[6,1]{1,0} parameter(3)
  %x = bf16[2048,2048]{1,0} parameter(4)
  %f.0 = bf16[4,4096]{1,0} fusion(%a, %w), kind=kCustom, calls=%gemm
  %f.1 = bf16[6,2048,512]{2,1,0} fusion(%e, %i), kind=kLoop, calls={%take}
  %cb = (bf16[2048,2048]{1,0}, s8[33554432]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %cs = ((bf16[4,4096]{1,0}), bf16[4,4096]{1,0}, u32[]) copy-start(%f.0)
  %cd = bf16[4,4096]{1,0} copy-done(%cs)
  ROOT %r = bf16[4,4096]{1,0} add(%cd, %f.0)
}
"""
    program = hlo.parse(text)
    r = hlo.report(program, top=10, min_elements=1 << 20)
    assert [w["op"] for w in r["widened"]] == ["f.1"]
    assert r["widened"][0]["widens"] == "s8[67108864] -> bf16[6291456]" and "layers_3/mlp" in r["widened"][0]["source"]
    kinds = {k: v["count"] for k, v in r["by_kind"].items()}
    assert kinds["custom-call:__cublas$gemm"] == 1 and "copy-done" not in kinds and kinds["copy-start"] == 1
    assert program.ops["cb"].out_bytes == 2048 * 2048 * 2  # (its workspace is not data)


@pytest.mark.slow  # (a GPU benchmark script's CPU smoke run, 14-33 s: out of CI's time)
def test_ab_compare_times_each_checkout_own_code(tmp_path):
    """Each worker imports its own checkout's package, not the working directory's (which `python -c`
    puts first on sys.path: both sides once ran the same code), each B is compared with A; a folder
    without one is refused."""
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD", "vl2_jax"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    common = ["--model", "random:test", "--rounds", "1", "--new-tokens", "4", "--batches", "1"]
    r = _run("benchmarks/ab_compare.py", "--a", str(old), "--b", ".", "--b", str(old), *common)  # (--b twice: B1, B2)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert {(row["metric"], row["side"]) for row in rows} == {
        (m, side) for m in ("ttft_ms", "decode_b1", "whole_b1") for side in ("B1", "B2")}
    r = _run("benchmarks/ab_compare.py", "--a", str(tmp_path), "--b", ".", *common)
    assert r.returncode != 0 and "not its own vl2_jax" in r.stderr
    # the same checkout with other settings: prefill chunks and XLA flags
    r = _run("benchmarks/ab_compare.py", "--a", ".", "--b", ".@chunks=32,64,96@xla=--xla_backend_optimization_level=2",
             *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {json.loads(line)["side"] for line in r.stderr.splitlines() if line.startswith("{")} == {"B"}
    r = _run("benchmarks/ab_compare.py", "--a", ".", "--b", ".@chunk=32", *common)
    assert r.returncode != 0 and "unknown setting 'chunk'" in r.stderr
