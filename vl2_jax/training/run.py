"""What `python -m vl2_jax.finetune` does once its arguments are parsed: load the model and the data,
train (`loop.fit`), and write the output folder.

The output folder `out` holds, when training ends:
    config.json, tokenizer and processor files, params/, vl2_jax_checkpoint.json
                      the trained model as a converted checkpoint (LoRA merged in float32):
                      `load_model(out)` and `python -m generate --model out` read it
    adapters/         LoRA only: adapters.safetensors (`lora`'s keys) and adapter_config.json
    train_state/      the Orbax checkpoints of the whole train state (`--resume` reads the latest), its
                      settings (settings.json) and, once every output is written, finished.json
    metrics.json      the loss and aux_loss of every step from first_step (a resumed run's appended to the
                      earlier runs'; null for a step none recorded) and the eval losses by step, written
                      with each save of the train state

A quantized checkpoint (`python -m convert --quant`) is refused: its weights are not differentiable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
from flax import traverse_util

from vl2_jax.config import Runtime
from vl2_jax.errors import CheckpointError, InputError, check_can_create, same_file, some
from vl2_jax.load import load_model, preset, write_assets
from vl2_jax.orbax_io import COPIED_FILES, MANIFEST, saved_quant
from vl2_jax.processor import Processor
from vl2_jax.specs import folder_of
from vl2_jax.training import batches, export, lora
from vl2_jax.training.loop import Result, Settings, check_resumable, fit
from vl2_jax.training.loss import training_module, training_runtime

FINISHED = "finished.json"  # in train_state/: the step whose outputs were all written


@dataclasses.dataclass(frozen=True)
class Job:
    """A fine-tuning run: the model spec, data files, output folders and `Settings`."""

    model: str
    data: str
    out: str
    settings: Settings
    eval: str | None = None
    export_hf: str | None = None
    dtype: str = "float32"
    mesh: str | None = None
    resume: bool = False
    force: bool = False  # start over in an `out` that holds an earlier run (its train state is removed)
    remat: bool = True
    moe: str = "blocked"  # the routed experts' dispatch (`loss.DIFFERENTIABLE_MOE`)


def merged_params(result: Result, s: Settings) -> dict:
    """The trained model's parameters `{"params": tree}`: adapters folded in (float32) for LoRA."""
    st = result.state
    weights = {**st.frozen, **{k: v for k, v in st.trainable.items() if not lora.is_adapter(k)}}
    if s.lora_rank:
        weights = lora.merge(weights, {k: v for k, v in st.trainable.items() if lora.is_adapter(k)}, s.lora_scale)
    return {"params": traverse_util.unflatten_dict(weights, sep="/")}


def _sha256(path) -> str:
    """The hex SHA-256 of the file at `path` (the training data: a resumed run must read the same)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise InputError(f"cannot read --data {path} ({e.strerror or e}).") from None
    return digest.hexdigest()


def counted(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless `n` is 1: "1 step", "2 steps"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def finetune(job: Job, log: Callable[[str], None], bar: bool | None = None) -> Result | None:
    """Runs `job`; returns `fit`'s Result, or None where `job` resumes a finished run whose outputs were
    all written (nothing to do; with --export-hf the model is written again). Raises InputError / ConfigError / CheckpointError on bad
    input (see `batches` for what is refused and what skipped), before training where it can."""
    s, out = job.settings, Path(job.out)
    runtime = training_runtime(job.moe)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder.")
    for name, file in (("--data", job.data), ("--eval", job.eval)):
        if file is not None and not Path(file).is_file():
            raise InputError(f"{name} {file} is not a file.")
    _refuse_quantized(job.model, _saved_quant(job.model))
    if job.resume and not (out / "train_state").is_dir():
        raise InputError(f"--resume: {out / 'train_state'} does not exist; run without --resume first.")
    model_settings = {"model": _model_id(job.model), "dtype": job.dtype, "moe": job.moe,
                      "data_sha256": _sha256(job.data)}  # (a resumed run trains on the same conversations)
    if job.resume:
        check_resumable(out / "train_state", s, model_settings)
    start_over = not job.resume and out.is_dir() and any(out.iterdir())
    if start_over and not job.force:
        raise InputError(f"--out {out} already holds files (an earlier run?); pass --resume to continue its "
                         f"run, --force to start over there, or another --out.")
    hf = Path(job.export_hf).absolute() if job.export_hf else None
    if start_over and (why := _not_a_run(out, hf)) is not None:
        raise InputError(f"--out {out} {why}, so --force will not start over there; choose another --out.")
    check_can_create(out, "--out")
    if hf is not None:
        _check_export_hf(hf, job, out)
    if job.resume and hf is None and _finished(out) == s.steps:
        return None  # (every output written: nothing to do)
    # The data is read before the weights (seconds to minutes) where the tokenizer is at hand, so a bad
    # line ends the run at once.
    processor = _processor_before_loading(job.model)
    if processor is not None:
        train, evals = _read_data(job, processor, log)
    model = load_model(job.model, job.dtype, runtime=Runtime.plain(), mesh=job.mesh, seed=s.seed, progress=log)
    _refuse_quantized(job.model, model.quant)  # (a hub id's copy, converted only now)
    if processor is None:
        train, evals = _read_data(job, model.processor, log)
    if start_over:  # (only now that the data and the model are good) the old run's outputs go
        for name in ("train_state", "adapters"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.json").unlink(missing_ok=True)
        (out / "train_state").mkdir()  # (still a run's folder, should this run fail before it saves)
    earlier = _read_metrics(out / "metrics.json", log) if job.resume else None
    what = f"LoRA rank {s.lora_rank} on {','.join(s.parts)}" if s.lora_rank else f"full fine-tuning of {','.join(s.parts)}"
    each = f"{s.batch} x {s.grad_accum} conversations" if s.grad_accum > 1 else counted(s.batch, "conversation")
    log(f"training: {what}; {counted(s.steps, 'step')} of {each}")
    if s.batch * s.grad_accum > len(train):
        log(f"note: a step takes {s.batch * s.grad_accum} conversations and {job.data} has {len(train)}, so each "
            "step takes some of them more than once")

    def write_metrics(so_far: Result) -> None:
        first = int(so_far.state.step) - len(so_far.losses) + 1
        metrics = merged_metrics(earlier, first, so_far.losses, so_far.aux_losses, so_far.evals)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")

    with model.mesh_context():
        result = fit(training_module(model.cfg, model.dtype, runtime, remat=job.remat), model.processor, model.params, train, s,
                     state_dir=out / "train_state", eval_examples=evals, resume=job.resume, log=log, bar=bar,
                     model_settings=model_settings, on_save=write_metrics)
        params = merged_params(result, s)
    dtype = jnp.dtype(model.dtype).name
    source = folder_of(job.model)
    export.save_model(model.cfg, params, out, source, dtype)
    if s.lora_rank:
        adapters = {k: v for k, v in result.state.trainable.items() if lora.is_adapter(k)}
        adapter_config = {"rank": s.lora_rank, "alpha": s.lora_alpha, "parts": list(s.parts), "base_model": model_settings["model"]}
        export.save_adapters(adapters, out / "adapters", adapter_config)
    log(f"saved the trained model to {out}")
    if hf is not None:  # (weights it held: refused above without --force)
        staged = hf.with_name(f"{hf.name}.partial-{os.getpid()}")
        try:
            export.replace_into(export.write_hf(model.cfg, params, staged, source, dtype), hf)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log(f"wrote the Hugging Face layout to {hf}")
    (out / "train_state" / FINISHED).write_text(json.dumps({"step": int(result.state.step)}) + "\n")
    return result


def _check_export_hf(hf: Path, job: Job, out: Path) -> None:
    """Refuses (InputError) an --export-hf folder `hf` the export must not or cannot write: a file, the
    --model or --out folder, a converted checkpoint or a run, one this user cannot create or write in,
    or one that holds weights already (without --force)."""
    if hf.exists() and not hf.is_dir():
        raise InputError(f"--export-hf {hf} exists and is not a folder.")
    for other, what in ((folder_of(job.model), "the --model folder"), (out, "the --out folder")):
        if other is not None and same_file(hf, other):
            raise InputError(f"--export-hf {hf} is {what}; choose another folder for the Hugging Face layout.")
    if any((hf / name).exists() for name in (MANIFEST, "params", "train_state")):
        raise InputError(f"--export-hf {hf} holds a converted checkpoint or a fine-tuning run, which the Hugging "
                         "Face layout would break; choose another --export-hf.")
    check_can_create(hf, "--export-hf")
    if hf.exists():  # (the export is written beside it first, then moved in: its folder is written too)
        check_can_create(hf.parent, "--export-hf's folder")
    if (held := export.weight_files(hf)) and not job.force:
        what = "remove them" if job.resume else "pass --force to replace them"
        raise InputError(f"--export-hf {hf} already holds weights ({some([p.name for p in held], 3)}); {what}, or choose "
                         f"another --export-hf.")


RUN_ENTRIES = {MANIFEST, MANIFEST + ".tmp", "params", *COPIED_FILES, "adapters", "train_state", "metrics.json"}


def _not_a_run(out: Path, hf: Path | None) -> str | None:
    """Why `--force` may not start over in the folder `out` (None: it holds an earlier run, with its
    train_state/, and nothing that no run writes; an --export-hf `hf` inside it counts as the run's)."""
    entries = {entry.name for entry in out.iterdir()}
    if not (out / "train_state").is_dir():
        return "holds no earlier run (no train_state/)"
    ours = (".export-",) + ((hf.name, f"{hf.name}.partial-") if hf is not None and hf.parent == out.absolute() else ())
    other = sorted(name for name in entries - RUN_ENTRIES if not name.startswith(ours))
    return f"holds files that no run writes ({some(other, 4)})" if other else None


def _finished(out: Path) -> int | None:
    """The step whose outputs (model, adapters, --export-hf) a run into `out` wrote to the end, if any
    (and its train state is still there)."""
    try:
        step = int(json.loads((out / "train_state" / FINISHED).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if (out / "train_state" / str(step)).is_dir() else None


def merged_metrics(earlier: dict | None, first_step: int, losses: list, aux_losses: list, evals: dict) -> dict:
    """metrics.json's content: the entries of `earlier` (an earlier run's metrics.json) for the steps before
    `first_step`, then this run's from `first_step` on; a step neither recorded has null losses."""
    if not earlier or earlier["first_step"] >= first_step:
        start, old_losses, old_aux, old_evals = first_step, [], [], {}
    else:
        start, n = earlier["first_step"], first_step - earlier["first_step"]
        old_losses = (earlier["losses"] + [None] * n)[:n]
        old_aux = (earlier["aux_losses"] + [None] * n)[:n]
        old_evals = {step: v for step, v in earlier["evals"].items() if int(step) < first_step}
    return {"first_step": start, "losses": old_losses + list(losses), "aux_losses": old_aux + list(aux_losses),
            "evals": {**old_evals, **{str(step): v for step, v in evals.items()}}}


def _read_metrics(file: Path, log: Callable[[str], None]) -> dict | None:
    """An earlier run's metrics.json (first_step, losses, aux_losses, evals), or None where there is none
    or it cannot be read (logged: the resumed run then starts a new one)."""
    if not file.is_file():
        return None
    try:
        metrics = json.loads(file.read_text())
        return {"first_step": int(metrics["first_step"]), "losses": list(metrics["losses"]),
                "aux_losses": list(metrics.get("aux_losses", [])),
                "evals": {str(int(step)): v for step, v in metrics.get("evals", {}).items()}}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"{file} is unreadable ({type(e).__name__}: {e}); the resumed run's metrics start a new one")
        return None


def _model_id(spec: str) -> str:
    """The model spec as a resumed run must repeat it: a folder as its absolute path, others as given."""
    return spec if spec.startswith("random:") or not Path(spec).exists() else str(Path(spec).resolve())


def _saved_quant(spec: str) -> str:
    """The weight format of the converted checkpoint `spec` loads, where known before loading: "none" for
    random weights, a Hugging Face folder or a hub id not converted yet (or a manifest `load_model` refuses)."""
    folder = folder_of(spec)
    if folder is None or not (folder / MANIFEST).is_file():
        return "none"
    try:
        return saved_quant(folder)
    except CheckpointError:
        return "none"


def _refuse_quantized(spec: str, quant: str) -> None:
    if quant != "none":
        raise InputError(f"--model {spec} holds {quant} weights and fine-tuning needs float ones; convert the "
                         f"original checkpoint again without --quant (python -m convert SRC DST) and pass that.")


def _processor_before_loading(spec: str) -> Processor | None:
    """The processor of model spec `spec` without its weights: a random model's, a folder's, a hub id's
    converted copy's; None where its files are not here yet (a hub id not downloaded)."""
    if spec.startswith("random:"):
        with tempfile.TemporaryDirectory(prefix="vl2-processor-") as folder:
            return Processor.from_pretrained(write_assets(folder, preset(spec.removeprefix("random:"))))
    folder = folder_of(spec)
    if folder is None or not (folder / "processor_config.json").is_file():
        return None
    return Processor.from_pretrained(folder)


def _read_data(job: Job, processor: Processor, log: Callable[[str], None]) -> tuple[list, list | None]:
    """The training and eval examples (`batches.read_examples`), each file's count logged."""
    read = []
    for file in (job.data, job.eval):
        if file is None:
            read.append(None)
            continue
        examples, skipped = batches.read_examples(processor, file, job.settings.max_seq_len)
        extra = f", {skipped.total} skipped ({skipped})" if skipped.total else ""
        log(f"{file}: {counted(len(examples), 'conversation')}{extra}")
        read.append(examples)
    return read[0], read[1]
