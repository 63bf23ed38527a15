"""Which lines of the model a compiled engine program's memory traffic comes from, read from its
optimized HLO: every operation the device runs (the top-level instructions of the entry computation
and of the loops, branches and calls it runs; a fusion counts once, as one kernel), its output bytes, an
upper bound of the bytes it reads (its operands whole: a gather or slice reads less), and the model's
source lines it came from (the metadata's stack frames inside `vl2_jax`).

    python benchmarks/hlo_traffic.py --model random:small --quant int8      # on a GPU
    python benchmarks/hlo_traffic.py --model random:test --quant int8       # CPU smoke
    python benchmarks/hlo_traffic.py --model random:small --quant int8 --program "prefill(1, 1024)"
    python benchmarks/hlo_traffic.py --hlo decode.hlo.gz                    # a saved program

It lists the operations that widen a quantized weight, i.e. write a 16- or 32-bit float copy of a
1-byte operand, whole or a gathered or sliced part of it (a dequantized weight kept in memory between
two kernels: the "hidden bf16 copy" a decode step must not have; an op that converts and multiplies in
one fusion reads the 1-byte values and is not listed), then the operations per step by kind, by source
line (the same line of every layer together) and the ones that write the most. The program is by default the engine's decode program for one slot at
the first key bucket, greedy (as `quant_compare.py` measures its `cost_analysis`), or any other engine
program (--program; --max-batch for the decode programs of more slots); --save writes its HLO text.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import json
import re
import sys

FP8 = {"f8e4m3fn", "f8e5m2", "f8e4m3", "f8e4m3fnuz", "f8e5m2fnuz", "f8e4m3b11fnuz", "f8e3m4", "f8e8m0fnu"}
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, **dict.fromkeys(FP8, 1), "s4": 1, "u4": 1, "s2": 1, "u2": 1,
            "f4e2m1fn": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
            "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
NARROW = {"s8", "s4", "u4", "f4e2m1fn", *FP8}  # quantized weights' value types (not u8: pixels)
WIDE_FLOATS = {"bf16", "f16", "f32"}
# opcodes that move no data themselves (views, control flow, bookkeeping; an async pair counts at its start)
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
        "after-all", "opt-barrier", "partition-id", "replica-id", "iota", "async-start"}
# custom calls whose output tuple ends in scratch space (cuBLAS and cuDNN workspaces): only element 0 is data
_WORKSPACE_CALLS = ("__cublas", "__cudnn")

_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,<=]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*)$")


@dataclasses.dataclass
class Op:
    name: str
    opcode: str
    kind: str  # fusion kind or custom call target, else ""
    out: list[tuple[str, int]]  # (dtype, elements) per array of the output
    operands: list[str]
    calls: list[str]
    frame: int | None
    scope: str  # the metadata's op_name: the module path, e.g. ".../LanguageModel.decode/layers_2/mlp/..."
    computation: str
    index: int | None = None  # a get-tuple-element's

    @property
    def out_bytes(self) -> int:
        arrays = self.out[:1] if self.opcode == "custom-call" and self.kind.startswith(_WORKSPACE_CALLS) else self.out
        return sum(ITEMSIZE.get(t, 4) * n for t, n in arrays)


def _arrays(shape: str) -> list[tuple[str, int]]:
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d.removeprefix("<="))  # (a dynamic dimension: its bound)
        out.append((dtype, n))
    return out


def _split_shape(rest: str) -> tuple[str, str]:
    """'(s32[], bf16[2]) while(...)' -> ('(s32[], bf16[2])', 'while(...)')."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 2:]
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _call_args(tail: str) -> tuple[str, str, str]:
    """'fusion(%a, %b), kind=kLoop, ...' -> ('fusion', '%a, %b', ', kind=kLoop, ...')."""
    opcode, _, rest = tail.partition("(")
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return opcode, rest[:i], rest[i + 1:]
    return opcode, rest, ""


@dataclasses.dataclass
class Program:
    ops: dict[str, Op]
    computations: dict[str, list[str]]
    entry: str
    frames: dict[int, tuple[str, int, str]]  # stack frame id -> (file, line, function)

    def executed(self) -> list[Op]:
        """The operations the device runs, in order: the entry's, then those of the loops, branches
        and calls they run (fused computations and reducers are inside their op)."""
        out, todo, seen = [], [self.entry], set()
        while todo:
            comp = todo.pop(0)
            if comp in seen:
                continue
            seen.add(comp)
            for name in self.computations[comp]:
                op = self.ops[name]
                if op.opcode in ("while", "conditional", "call", "async-start"):
                    todo += op.calls
                if op.opcode not in FREE and not op.opcode.endswith(("-done", "-update")):
                    out.append(op)
        return out

    def source(self, op: Op) -> str:
        """Where the op comes from: its innermost source line (the model's, or a library's it calls,
        e.g. qwix's) and its module path (the metadata's op_name past the program's own scopes), e.g.
        "modules/layers.py:91 qeinsum @ layers_2/mlp/shared"; a fusion without metadata of its own takes
        its fused computation's; "?" where neither has any."""
        carrier = op
        if op.frame is None and not op.scope:
            for comp in op.calls:
                found = [self.ops[n] for n in reversed(self.computations.get(comp, [])) if self.ops[n].frame or self.ops[n].scope]
                if found:
                    carrier = found[0]
                    break
        line = ""
        if carrier.frame in self.frames:
            file, number, function = self.frames[carrier.frame]
            line = f"{file.split('vl2_jax/', 1)[-1]}:{number} {function}"
        scope = carrier.scope.split("LanguageModel.", 1)[-1].split("/", 1)[-1] if "LanguageModel." in carrier.scope else carrier.scope
        if line or scope:
            return " @ ".join(x for x in (line, scope) if x)
        weights = [w for n in op.operands if (w := self.weight(n))]
        return f"reads {', '.join(dict.fromkeys(weights))}" if weights else "?"

    def weight(self, name: str, depth: int = 0) -> str | None:
        """The parameter an operand is or is made from alone (through loop tuples and one-input ops:
        views, copies, converts; a few ops deep), as its path ("layers_0/attn/kv_a_w/qvalue"): names
        an op without metadata of its own. A loop-carried element is named after the loop's initial
        value, right for what the loop passes through unchanged (weights), and only parameters named
        "params..." (the model's) are named."""
        op = self.ops.get(name)
        if op is None or depth > 6:
            return None
        if op.opcode == "parameter" and op.computation == self.entry:
            keys = [k for k in re.split(r"_{2,}", re.sub(r"\.\d+$", "", name)) if k]  # (jax's argument names)
            return "/".join(keys[2:] if keys[:2] == ["params", "params"] else keys) if keys[:1] == ["params"] else None
        if op.opcode == "get-tuple-element" and op.operands and op.index is not None:
            source = self.ops.get(op.operands[0])
            if source is not None and source.opcode == "parameter":  # a loop body's carried tuple
                loop = self._loops.get(source.computation)
                source = self.ops.get(loop.operands[0]) if loop is not None and loop.operands else None
            if source is not None and source.opcode == "tuple" and op.index < len(source.operands):
                return self.weight(source.operands[op.index], depth + 1)
            return None
        if len(op.operands) == 1:  # a view, a copy, or what XLA hoisted out of a loop (a converted weight)
            return self.weight(op.operands[0], depth + 1)
        return None

    @functools.cached_property
    def _loops(self) -> dict[str, Op]:
        """Each loop body's computation -> its while op."""
        return {c: op for op in self.ops.values() if op.opcode == "while" for c in op.calls}

    def read_bytes(self, op: Op) -> int:
        """Upper bound: every operand whole (each once)."""
        return sum(self.ops[n].out_bytes for n in dict.fromkeys(op.operands) if n in self.ops)

    def widens(self, op: Op, min_elements: int) -> str | None:
        """The 1-byte operand this op writes a float copy of, whole (as many elements) or in part (a
        gather or slice of it, converted in the same op), if any: "s8[N] -> bf16[M]"."""
        if len(op.out) != 1 or op.out[0][0] not in WIDE_FLOATS or op.out[0][1] < min_elements:
            return None
        (wide, m), narrow = op.out[0], []
        for n in op.operands:
            arrays = self.ops[n].out if n in self.ops else []
            if len(arrays) == 1 and arrays[0][0] in NARROW and arrays[0][1] >= m:
                narrow.append(arrays[0])
        if not narrow:
            return None
        whole = [a for a in narrow if a[1] == m]
        if not whole and not self._converts_narrow(op):  # (a product that reads the weight in place)
            return None
        t, n = (whole or narrow)[0]
        return f"{t}[{n}] -> {wide}[{m}]"

    def _converts_narrow(self, op: Op) -> bool:
        """Whether the op is, or its fused computation holds, a convert from a 1-byte type that feeds no
        product or reduction there (one that does is read in place: e.g. a Triton GEMM fusion)."""
        inner = [op] + [self.ops[n] for c in op.calls for n in self.computations.get(c, [])]
        if any(o.opcode in ("dot", "convolution", "reduce", "scaled-dot") for o in inner):
            return False
        return any(o.opcode == "convert" and any(self.ops[x].out[:1] and self.ops[x].out[0][0] in NARROW
                                                 for x in o.operands if x in self.ops) for o in inner)


def parse(text: str) -> Program:
    files, functions, locations, stack = {}, {}, {}, {}
    table, ops, computations, entry, current = None, {}, {}, None, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = line
            continue
        if table and (m := re.match(r"^(\d+) (.*)$", line)):
            key, value = int(m.group(1)), m.group(2)
            if table in ("FileNames", "FunctionNames"):
                (files if table == "FileNames" else functions)[key] = value.strip('"')
            else:
                fields = dict(re.findall(r"(\w+)=(\d+)", value))
                (locations if table == "FileLocations" else stack)[key] = fields
            continue
        table = None
        if m := _HEADER.match(line):
            current = m.group(2)
            computations[current] = []
            entry = current if m.group(1) else entry
            continue
        if current is None or not (m := _INSTRUCTION.match(line)):
            continue
        name, rest = m.groups()
        shape, tail = _split_shape(rest)
        opcode, args, attrs = _call_args(tail)
        calls = re.findall(r"(?:calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)", attrs)
        for group in re.findall(r"(?:branch_computations|calls)=\{([^}]*)\}", attrs):
            calls += re.findall(r"%([\w.\-]+)", group)
        kind = re.search(r"kind=(\w+)|custom_call_target=\"([^\"]+)\"", attrs)
        frame = re.search(r"stack_frame_id=(\d+)", attrs)
        scope = re.search(r'op_name="([^"]*)"', attrs)
        index = re.search(r"\bindex=(\d+)", attrs)
        ops[name] = Op(name, opcode, (kind.group(1) or kind.group(2)) if kind else "", _arrays(shape),
                       re.findall(r"%([\w.\-]+)", args), calls, int(frame.group(1)) if frame else None,
                       scope.group(1) if scope else "", current, int(index.group(1)) if index else None)
        computations[current].append(name)
    frames = {}
    for fid, f in stack.items():
        loc = locations.get(int(f.get("file_location_id", 0)), {})
        frames[fid] = (files.get(int(loc.get("file_name_id", 0)), "?"), int(loc.get("line", 0)),
                       functions.get(int(loc.get("function_name_id", 0)), "?"))
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return Program(ops, computations, entry, frames)


def report(program: Program, top: int = 20, min_elements: int = 1 << 20) -> dict:
    """A summary dict: per-kind and per-source counts and bytes, the widening ops, the top writers."""
    ops = program.executed()
    read = {op.name: program.read_bytes(op) for op in ops}
    source = {op.name: program.source(op) for op in ops}

    def tally(key, limit=None) -> dict:
        """{key(op): count, written, read at most}, the most read first."""
        rows = collections.defaultdict(lambda: [0, 0, 0])
        for op in ops:
            row = rows[key(op)]
            row[0], row[1], row[2] = row[0] + 1, row[1] + op.out_bytes, row[2] + read[op.name]
        ranked = sorted(rows.items(), key=lambda kv: -kv[1][2])[:limit]
        return {k: {"count": c, "written": w, "read_at_most": r} for k, (c, w, r) in ranked}

    widened = [{"op": op.name, "kind": op.kind or op.opcode, "widens": w, "source": source[op.name]}
               for op in ops if (w := program.widens(op, min_elements))]
    writers = sorted(ops, key=lambda op: -op.out_bytes)[:top]
    return {
        "ops": len(ops),
        "written_bytes": sum(op.out_bytes for op in ops),
        "read_bytes_upper_bound": sum(read.values()),
        "by_kind": tally(lambda op: f"{op.opcode}:{op.kind}" if op.kind else op.opcode),
        # (the same line in every layer: one row)
        "by_source": tally(lambda op: re.sub(r"layers_\d+", "layers_*", source[op.name]), top),
        "widened": widened,
        "widened_bytes": sum(program.ops[op["op"]].out_bytes for op in widened),
        "top_writers": [{"op": op.name, "kind": op.kind or op.opcode, "written": op.out_bytes,
                         "read_at_most": read[op.name], "source": source[op.name]} for op in writers],
    }


def print_report(title: str, r: dict) -> None:
    mb = lambda b: f"{b / 1e6:.1f}"
    print(f"\n## {title}: {r['ops']} device ops, {mb(r['written_bytes'])} MB written, "
          f"<= {mb(r['read_bytes_upper_bound'])} MB read; {len(r['widened'])} widened weights "
          f"({mb(r['widened_bytes'])} MB of float copies)")
    if r["widened"]:
        print("\n| widening op | kind | copy | source |\n|---|---|---|---|")
        for w in r["widened"]:
            print(f"| {w['op']} | {w['kind']} | {w['widens']} | {w['source']} |")
    print("\n| op kind | count | written MB | read MB (at most) |\n|---|---|---|---|")
    for k, v in list(r["by_kind"].items())[:15]:
        print(f"| {k} | {v['count']} | {mb(v['written'])} | {mb(v['read_at_most'])} |")
    print("\n| source (every layer) | ops | written MB | read MB (at most) |\n|---|---|---|---|")
    for k, v in r["by_source"].items():
        print(f"| {k} | {v['count']} | {mb(v['written'])} | {mb(v['read_at_most'])} |")
    print("\n| top writer | kind | written MB | read MB (at most) | source |\n|---|---|---|---|---|")
    for w in r["top_writers"]:
        print(f"| {w['op']} | {w['kind']} | {mb(w['written'])} | {mb(w['read_at_most'])} | {w['source']} |")


def program_hlo(spec: str, quant: str, max_seq_len: int, program: str, max_batch: int = 1) -> str:
    """The optimized HLO text of one of `spec`'s engine programs (one device), named as the engine names
    them, e.g. "decode(8, 512, True)" or "prefill(1, 1024)"; None: decode for one slot at the first key
    bucket, greedy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vl2_jax import load
    from vl2_jax.config import Runtime

    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    m = load.load_model(spec, dtype, runtime=Runtime(max_batch=max_batch, max_seq_len=max_seq_len),
                        quant=None if quant == "none" else quant)
    engine = m.engine
    names = {f"{kind}{static}": (kind, static) for kind, static in engine.programs()}
    # (the first key bucket: the capacity where the decode attention kernel runs, whose custom call counts
    # the whole cache as read)
    program = program or f"decode{(1, engine.decode_key_buckets[0], True)}"
    if program not in names:
        sys.exit(f"no program {program!r} at max_batch {max_batch} and max_seq_len {max_seq_len}; the engine has: "
                 + ", ".join(names))
    state = m.take_state()
    try:
        n = engine.capacity  # (one device: `load_model` without a mesh)
        host = tuple(engine._put(np.full((n,), engine.pad_id, np.int32), np.zeros((n,), np.int32), np.zeros((n,), bool)))
        stand_ins = engine._stand_ins(lambda shape, dtype: jnp.zeros(shape, dtype))
        fn, args, static = engine._warmup_call(*names[program], m.params, state, host, stand_ins)
        compiled = fn.lower(*args, *static).compile()
    finally:
        m.give_state(state)
    return compiled.as_text()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--quant", default="none", choices=["none", "int8", "fp8"])
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--program", default=None,
                   help='the engine program to read, as the engine names it, e.g. "prefill(1, 1024)" (default: '
                        'decode for one slot at the first key bucket, greedy)')
    p.add_argument("--max-batch", type=int, default=1, help="the engine's slots (decode programs exist for "
                   "1, 2, 4, ... up to it)")
    p.add_argument("--hlo", default=None, help="read this saved HLO text (.gz or plain) instead of compiling")
    p.add_argument("--save", default=None, help="write the compiled program's HLO text here (.gz: compressed)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--min-elements", type=int, default=1 << 20, help="smallest weight counted as widened")
    args = p.parse_args()
    if args.hlo:
        opener = gzip.open if args.hlo.endswith(".gz") else open
        with opener(args.hlo, "rt") as f:
            text, title = f.read(), args.hlo
    else:
        text = program_hlo(args.model, args.quant, args.max_seq_len, args.program, args.max_batch)
        title = f"{args.model} {args.quant} {args.program or 'decode'}"
    if args.save:
        opener = gzip.open if args.save.endswith(".gz") else open
        with opener(args.save, "wt") as f:
            f.write(text)
    r = report(parse(text), args.top, args.min_elements)
    print(json.dumps({"program": title, **{k: v for k, v in r.items() if k not in ("by_kind", "by_source", "top_writers")}}))
    print_report(title, r)


if __name__ == "__main__":
    sys.exit(main())
