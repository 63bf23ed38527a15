"""What `python -m vl2_jax.finetune` does once its arguments are parsed: load the model and the data,
train (`loop.fit`), and write the output folder.

The output folder `out` holds, when training ends:
    config.json, tokenizer and processor files, params/, vl2_jax_checkpoint.json
                      the trained model as a converted checkpoint (LoRA merged in float32):
                      `load_model(out)` and `python -m generate --model out` read it
    adapters/         LoRA only: adapters.safetensors (`lora`'s keys) and adapter_config.json
    train_state/      the Orbax checkpoints of the whole train state (`--resume` reads the latest)
    metrics.json      the loss and aux_loss of every step this run took (from first_step) and the eval losses
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
from flax import traverse_util

from vl2_jax.config import Runtime
from vl2_jax.errors import InputError
from vl2_jax.load import load_model, preset, write_assets
from vl2_jax.processor import Processor
from vl2_jax.specs import folder_of
from vl2_jax.training import batches, export, lora
from vl2_jax.training.loop import Result, Settings, fit
from vl2_jax.training.loss import training_module, training_runtime


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


def finetune(job: Job, log: Callable[[str], None], bar: bool | None = None) -> Result:
    """Runs `job`; returns `fit`'s Result. Raises InputError / ConfigError / CheckpointError on bad
    input (see `batches` for what is refused and what skipped)."""
    s, out = job.settings, Path(job.out)
    runtime = training_runtime(job.moe)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder.")
    for name, file in (("--data", job.data), ("--eval", job.eval)):
        if file is not None and not Path(file).is_file():
            raise InputError(f"{name} {file} is not a file.")
    if job.resume and not (out / "train_state").is_dir():
        raise InputError(f"--resume: {out / 'train_state'} does not exist; run without --resume first.")
    start_over = not job.resume and out.is_dir() and any(out.iterdir())
    if start_over and not job.force:
        raise InputError(f"--out {out} already holds files (an earlier run?); pass --resume to continue its "
                         f"run, --force to start over there, or another --out.")
    # The data is read before the weights (seconds to minutes) where the tokenizer is at hand, so a bad
    # line ends the run at once.
    processor = _processor_before_loading(job.model)
    if processor is not None:
        train, evals = _read_data(job, processor, log)
    model = load_model(job.model, job.dtype, runtime=Runtime.plain(), mesh=job.mesh, seed=s.seed, progress=log)
    if processor is None:
        train, evals = _read_data(job, model.processor, log)
    if start_over:  # (only now that the data and the model are good) the old run's outputs go
        for name in ("train_state", "adapters"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.json").unlink(missing_ok=True)
    what = f"LoRA rank {s.lora_rank} on {','.join(s.parts)}" if s.lora_rank else f"full fine-tuning of {','.join(s.parts)}"
    log(f"training: {what}; {s.steps} steps of {s.batch} x {s.grad_accum} conversations")
    with model.mesh_context():
        result = fit(training_module(model.cfg, model.dtype, runtime, remat=job.remat), model.processor, model.params, train, s,
                     state_dir=out / "train_state", eval_examples=evals, resume=job.resume, log=log, bar=bar)
        params = merged_params(result, s)
    dtype = jnp.dtype(model.dtype).name
    source = folder_of(job.model)
    export.save_model(model.cfg, params, out, source, dtype)
    if s.lora_rank:
        adapters = {k: v for k, v in result.state.trainable.items() if lora.is_adapter(k)}
        export.save_adapters(adapters, out / "adapters",
                             {"rank": s.lora_rank, "alpha": s.lora_alpha, "parts": list(s.parts), "base_model": job.model})
    if result.losses:  # a resumed run that had nothing left to do keeps the last run's
        metrics = {"first_step": int(result.state.step) - len(result.losses) + 1, "losses": result.losses,
                   "aux_losses": result.aux_losses, "evals": result.evals}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"saved the trained model to {out}")
    if job.export_hf:
        export.write_hf(model.cfg, params, job.export_hf, source, dtype)
        log(f"wrote the Hugging Face layout to {job.export_hf}")
    return result


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
        log(f"{file}: {len(examples)} conversations" + (f", {skipped.total} skipped ({skipped})" if skipped.total else ""))
        read.append(examples)
    return read[0], read[1]
