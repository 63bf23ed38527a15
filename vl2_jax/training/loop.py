"""The fine-tuning loop: what learns (LoRA or full), the optimizer, the accumulating step, Orbax
checkpoints of the whole train state, eval, and the progress bar.

One optimizer step reads `grad_accum` microbatches of `batch` rows ([A, B, T] inputs, `batches.stack`)
and scans over them, summing the cross-entropy and the target count and the gradient of the sum; the
loss and gradient are divided once by the step's target count. So the step's loss is the mean over
every target token of the step, and `batch 8` equals `batch 2, grad_accum 4` up to float rounding.

The optimizer is optax AdamW under a linear warmup then cosine decay to zero
(`optax.warmup_cosine_decay_schedule`), after clipping the gradient's global norm.

The objective adds the experts' balance loss of the official MoEGate (`loss.balance_loss`) times
`aux_loss_alpha` (`loss.balance_alpha`: 0 for `noaux_tc` routing, which the official code does not
train) to the mean cross-entropy: alpha times the balance loss summed over MoE layers and averaged over
the step's rows (all microbatches' rows together, so accumulation leaves it unchanged). As in the official
code, `loss` is the cross-entropy alone; the added term is reported beside it as `aux_loss`. At alpha 0
the step is the cross-entropy's alone, the forward computing no router outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from vl2_jax.engine import CompileWatch
from vl2_jax.errors import ConfigError, deferred_interrupt
from vl2_jax.modules.vl2 import VL2
from vl2_jax.orbax_io import MANIFEST
from vl2_jax.processor import Processor
from vl2_jax.training import batches, fsdp, lora
from vl2_jax.training.loss import (
    LossInputs,
    balance_alpha,
    balance_loss,
    cross_entropy,
    forward,
    forward_with_router,
    target_mask,
)
from vl2_jax.training.parts import PARTS
from vl2_jax.training.train import TrainState

# Full fine-tuning's parameters per part; the router's correction bias (noaux_tc) is never trained.
FULL_PREFIXES = {"language": ("language/",), "projector": ("projector/", "image_newline", "view_separator"),
                 "vision": ("vision/",)}
FROZEN_ALWAYS = ("router_bias",)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run does. lora_rank 0 means full fine-tuning of `parts`; else LoRA adapters of that rank
    on `parts`' targets (`lora.TARGETS`), scaled by lora_alpha / lora_rank."""

    steps: int = 100
    batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    max_seq_len: int = 1024
    seed: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    parts: tuple[str, ...] = ("language",)
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end (when there is an eval set)

    def __post_init__(self):
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ConfigError(f"--train takes a comma-separated subset of {','.join(PARTS)} (got {','.join(self.parts)}).")
        if self.warmup >= self.steps:
            raise ConfigError(f"--warmup ({self.warmup}) must be below --steps ({self.steps}).")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"--lr must be a finite number above 0 (got {self.lr}).")
        if not 0 <= self.clip <= float("inf"):
            raise ConfigError(f"--clip must be a number, 0 or more (0: no clipping; got {self.clip}).")
        if self.lora_rank and not 0 < self.lora_alpha < float("inf"):
            raise ConfigError(f"--lora-alpha must be a finite number above 0 (got {self.lora_alpha}).")

    @property
    def lora_scale(self) -> float | None:
        return self.lora_alpha / self.lora_rank if self.lora_rank else None

    def resumable(self) -> dict:
        """The settings a resumed run must share (all that shape the data order, the schedule and the
        state; the save and eval intervals may change)."""
        keys = ("steps", "batch", "grad_accum", "lr", "warmup", "weight_decay", "clip", "max_seq_len", "seed",
                "lora_rank", "parts") + (("lora_alpha",) if self.lora_rank else ())  # (full fine-tuning has none)
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in keys}


def optimizer(s: Settings) -> optax.GradientTransformation:
    """Global-norm clipping (`clipping`), then AdamW under warmup + cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, s.warmup, s.steps, end_value=0.0)
    return optax.chain(clipping(s), optax.adamw(schedule, weight_decay=s.weight_decay))


def clipping(s: Settings) -> optax.GradientTransformation:
    """The gradient scaled to a global norm of at most `s.clip`; as it is where `clip` is 0."""
    return optax.clip_by_global_norm(s.clip) if s.clip > 0 else optax.identity()


def full_trainable(parts) -> Callable[[str], bool]:
    prefixes = tuple(p for part in parts for p in FULL_PREFIXES[part])
    return lambda path: path.startswith(prefixes) and not path.endswith(FROZEN_ALWAYS)


def init_state(params: dict, s: Settings, tx: optax.GradientTransformation) -> TrainState:
    """The step-0 state over `params` ({"params": tree}): adapters as the trainable leaves (LoRA) or the
    chosen parts' weights (full); everything else frozen. Under a mesh the trainable leaves and the
    optimizer state are split over data as well (`fsdp`)."""
    flat = traverse_util.flatten_dict(params.get("params", params), sep="/")
    if s.lora_rank:
        trainable, frozen = lora.init_adapters(flat, s.parts, s.lora_rank, s.seed), flat
    else:
        chosen = full_trainable(s.parts)
        trainable = {k: v for k, v in flat.items() if chosen(k)}
        frozen = {k: v for k, v in flat.items() if not chosen(k)}
    trainable, opt_state = fsdp.place(trainable, tx.init(trainable))
    return fsdp.commit(TrainState(jnp.zeros((), jnp.int32), trainable, frozen, opt_state))


def params_of(trainable: dict, frozen: dict, scale: float | None) -> dict:
    """The model's parameters `{"params": tree}` from a state's leaves (adapters applied, not merged)."""
    weights = {**frozen, **{k: v for k, v in trainable.items() if not lora.is_adapter(k)}}
    if scale is not None:
        weights = lora.effective_params(weights, {k: v for k, v in trainable.items() if lora.is_adapter(k)}, scale)
    return {"params": traverse_util.unflatten_dict(weights, sep="/")}


def step_fn(module: VL2, tx: optax.GradientTransformation, scale: float | None):
    """A jitted (state, inputs with leaves [A, ...]) -> (new state, metrics) that donates `state`.
    Metrics: loss (mean cross-entropy over the step's targets), aux_loss (alpha times the balance loss,
    0.0 at alpha 0), targets, grad_norm (before clipping)."""
    alpha = balance_alpha(module.cfg.language)

    def sums(trainable, frozen, inputs: LossInputs, aux_weight):
        """(differentiated sum, (cross-entropy sum, targets, balance sum, rows)) of one microbatch."""
        params = params_of(trainable, frozen, scale)
        if not alpha:
            t, c = cross_entropy(forward(module, params, inputs), inputs.labels, inputs.valid)
            return t, (t, c, jnp.float32(0), jnp.int32(0))
        logits, (scores, idx) = forward_with_router(module, params, inputs)
        t, c = cross_entropy(logits, inputs.labels, inputs.valid)
        a, rows = balance_loss(scores, idx, inputs.valid, module.cfg.language)
        return t + aux_weight * a, (t, c, a, rows)

    def step(state: TrainState, inputs: LossInputs):
        # The gradient is summed over microbatches and divided once by the step's target count n, so the
        # balance sum enters weighted by alpha * n / rows: alpha times its mean over the step's rows.
        n = jnp.maximum(jnp.sum(target_mask(inputs.labels, inputs.valid)), 1).astype(jnp.float32)
        rows = jnp.maximum(jnp.sum(jnp.any(inputs.valid, axis=-1)), 1).astype(jnp.float32)
        aux_weight = alpha * n / rows

        def micro(carry, mb):
            grads, total, count, balance = carry
            (_, (t, c, a, _)), g = jax.value_and_grad(sums, has_aux=True)(state.trainable, state.frozen, mb, aux_weight)
            return (jax.tree.map(jnp.add, grads, g), total + t, count + c, balance + a), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
        start = (zeros, jnp.float32(0), jnp.int32(0), jnp.float32(0))
        (grads, total, count, balance), _ = jax.lax.scan(micro, start, inputs)
        n = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, state.trainable)
        grads, _ = fsdp.constrain(grads, None, like=state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable, opt_state = fsdp.constrain(optax.apply_updates(state.trainable, updates), opt_state)
        new = TrainState(state.step + 1, trainable, state.frozen, opt_state)
        return new, {"loss": total / n, "aux_loss": alpha * balance / rows, "targets": count,
                     "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def compiled_step(module: VL2, s: Settings):
    """`step_fn` under `s`' optimizer, one per (module, settings) in a process, so that a second run at
    the same settings (a resumed one, an eval) compiles nothing again. Intervals do not count."""
    return step_fn(module, optimizer(s), s.lora_scale)


@functools.lru_cache(maxsize=8)
def eval_fn(module: VL2, scale: float | None):
    """A jitted (trainable, frozen, inputs [1, ...]) -> (summed cross-entropy, target count)."""

    def run(trainable, frozen, inputs: LossInputs):
        mb = jax.tree.map(lambda x: x[0], inputs)
        return cross_entropy(forward(module, params_of(trainable, frozen, scale), mb), mb.labels, mb.valid)

    return jax.jit(run)


def evaluate(run, state: TrainState, eval_inputs) -> float:
    """Mean cross-entropy over every target of the eval set."""
    total, count = 0.0, 0
    for inputs in eval_inputs:
        t, c = run(state.trainable, state.frozen, inputs)
        total, count = total + float(t), count + int(c)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------- checkpoints
def _manager(directory: Path):
    import orbax.checkpoint as ocp

    # Synchronous saves: the step donates the state's buffers, so they must be written before the next.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save_state(directory: Path, state: TrainState, s: Settings, model_settings: dict | None = None) -> None:
    """The whole train state (step, adapters or weights, frozen weights, optimizer moments) as the Orbax
    checkpoint `directory/<step>`, and the settings beside it (`settings.json`: `s.resumable()` and
    `model_settings`)."""
    import orbax.checkpoint as ocp

    directory.mkdir(parents=True, exist_ok=True)
    recorded = {**s.resumable(), **(model_settings or {})}
    (directory / "settings.json").write_text(json.dumps(recorded, indent=1) + "\n")
    with _manager(directory) as mgr:
        mgr.save(int(state.step), args=ocp.args.StandardSave(state), force=True)


def check_resumable(directory: Path, s: Settings, model_settings: dict | None = None) -> None:
    """Refuses (ConfigError) a resume from `directory` where it holds no train state or its run used
    other settings than `s` and `model_settings` (a setting it did not record is taken on trust)."""
    settings = directory / "settings.json"
    if not settings.is_file():
        raise ConfigError(f"--resume: {directory} holds no train state; run without --resume first.")
    saved = json.loads(settings.read_text())
    wanted = {**s.resumable(), **(model_settings or {})}
    differ = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k, v) != v}
    if differ.pop("data_sha256", None):
        raise ConfigError(f"--resume: the --data file is not the one the saved run in {directory} trained on (its "
                          f"contents differ); resume with that file, or start a new run on the new data (--force, or "
                          f"another --out).")
    if differ:
        text = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())
        advice = "use the same ones"
        if "steps" in differ:  # (the schedule ends at --steps: a run cannot be lengthened)
            advice += f" (--steps {saved['steps']}: the learning rate decays to zero there)"
            if (directory.parent / MANIFEST).is_file():
                advice += f", or train its model further in a new run (--model {directory.parent} --out ANOTHER)"
        raise ConfigError(f"--resume: the saved run in {directory} used other settings ({text}); {advice}.")


def restore_state(directory: Path, like: TrainState, s: Settings, model_settings: dict | None = None) -> TrainState:
    """The latest state saved in `directory`, restored into `like`'s shapes, dtypes and shardings.
    Refused (ConfigError) where there is none or its settings differ (`check_resumable`)."""
    import orbax.checkpoint as ocp

    check_resumable(directory, s, model_settings)
    with _manager(directory) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise ConfigError(f"--resume: {directory} holds no train state; run without --resume first.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


# --------------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class Result:
    """What `fit` did: the final state, the loss (mean cross-entropy) and the aux_loss (alpha times the
    experts' balance loss) of every step it ran (before that step's update), and the eval losses by step."""

    state: TrainState
    losses: list[float]
    evals: dict[int, float]
    aux_losses: list[float] = dataclasses.field(default_factory=list)


def fit(module: VL2, processor: Processor, params: dict, train: list, s: Settings, *, state_dir: Path | None = None,
        eval_examples: list | None = None, resume: bool = False, log: Callable[[str], None] | None = None,
        bar: bool | None = None, model_settings: dict | None = None,
        on_save: Callable[[Result], None] | None = None) -> Result:
    """Trains for `s.steps` optimizer steps (a resumed state counts the ones it took) on the examples
    `train` (`batches.read_examples`). Saves the train state to `state_dir` every `s.save_every` steps and
    at the end (when given), then calls `on_save` with the Result so far; `resume` starts from its latest.
    `model_settings` (the model, dtype, MoE dispatch, the data's digest): what else a resumed run must
    share, recorded with `s`. `bar`: tqdm on stderr (None: where stderr is a terminal). `params` is
    consumed (the step donates it); under a mesh, call it inside the model's `mesh_context()`. A Ctrl-C,
    SIGTERM or SIGHUP (on the main thread) stops the run after the step under way: the state is saved
    (with `state_dir`) and KeyboardInterrupt raised; a second one raises at once, unless the state is
    being written: then the write ends first."""
    from tqdm import tqdm

    log = log or (lambda line: None)
    tx = optimizer(s)
    state = init_state(params, s, tx)
    if resume:
        state = restore_state(state_dir, state, s, model_settings)
        log(f"resumed at step {int(state.step)} from {state_dir}")
    step = compiled_step(module, dataclasses.replace(s, save_every=0, eval_every=0))
    order = batches.Order(len(train), s.batch, s.grad_accum, s.seed)
    run_eval = eval_fn(module, s.lora_scale) if eval_examples else None
    eval_inputs = list(batches.eval_batches(processor, eval_examples, s.batch, s.max_seq_len)) if eval_examples else []
    losses, aux_losses, evals = [], [], {}
    start = int(state.step)
    progress = tqdm(total=s.steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
                    disable=None if bar is None else not bar)
    # A Ctrl-C, SIGTERM or SIGHUP ends the run after the step under way, its state saved; a second one at once.
    # (Stopping inside a step or an Orbax write left half-written checkpoints and crashes at exit.)
    with deferred_interrupt() as stop, progress:
        for i in range(start, s.steps):
            inputs = batches.stack(processor, [[train[j] for j in mb] for mb in order.step(i)], s.max_seq_len)
            tokens = int(np.sum(inputs.valid))
            t0 = time.perf_counter()
            with CompileWatch() as compiling:  # (a step of a new shape compiles: its time is no speed)
                state, metrics = step(state, inputs)
                loss, aux = float(metrics["loss"]), float(metrics["aux_loss"])
            seconds = time.perf_counter() - t0
            speed = (f"compiled in {compiling.seconds:.1f} s" if compiling.count
                     else f"{tokens / seconds:,.0f} tokens/s")
            losses.append(loss)
            aux_losses.append(aux)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {i + 1}; try a smaller --lr.")
            progress.set_postfix(loss=f"{loss:.4f}", aux_loss=f"{aux:.3g}", speed=speed, refresh=False)
            progress.update(1)
            done = i + 1
            if progress.disable and (done % max(1, s.steps // 20) == 0 or done == s.steps):
                log(f"step {done}/{s.steps}: loss {loss:.4f}, aux_loss {aux:.3g}, {speed}")
            if run_eval is not None and ((s.eval_every and done % s.eval_every == 0) or done == s.steps):
                evals[done] = evaluate(run_eval, state, eval_inputs)
                log(f"step {done}: eval loss {evals[done]:.4f}")
            due = (s.save_every and done % s.save_every == 0) or done == s.steps
            if state_dir is not None and (due or stop.is_set()):
                # a Ctrl-C while the state is written waits for the write's end (one inside it left a
                # half-written step and Orbax's traceback); a further one still raises at once
                with deferred_interrupt() as during:
                    save_state(state_dir, state, s, model_settings)
                    if on_save is not None:
                        on_save(Result(state, losses, evals, aux_losses))
                if during.is_set():
                    stop.set()
            if stop.is_set() and done == s.steps:
                log("stop noted at the last step: the run ends as it would have (again to stop at once)")
            if stop.is_set() and done < s.steps:
                progress.close()
                saved = f"; its train state is saved in {state_dir} (--resume continues)" if state_dir is not None else ""
                log(f"stopped at step {done}/{s.steps}{saved}")
                raise KeyboardInterrupt
    return Result(state, losses, evals, aux_losses)
