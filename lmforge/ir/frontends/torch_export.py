"""Capture a torch module or function into the IR through `torch.export`.

    graph = capture(model, (tokens,), dynamic={"tokens": {0: "batch", 1: "seq"}})

ATen ops map to IR ops through `ATEN_TO_IR` (one small function per ATen op). Shapes of views come
from the exported program's symbolic shapes, renamed to the user's dimension names, so `sym_size`
arithmetic disappears from the graph. An ATen op with no mapping becomes an explicit `torch_fallback`
node that the reference runs (never dropped); `lmforge inspect` lists those with their source line.
After translation, `recognize_attention` folds matmul-softmax-matmul chains into `attention`.
"""
from __future__ import annotations

import inspect
import keyword
import operator
import os
import re
import types
import warnings
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from lmforge.errors import CaptureError, VerifyError
from lmforge.ir.frontends.aten_rules import ATEN_RULES as ATEN_TO_IR
from lmforge.ir.frontends.unnamed_dims import export_unnamed
from lmforge.ir.graph import Graph, GraphBuilder, Value
from lmforge.ir.ops.tensor_ops import returns_view
from lmforge.ir.types import TensorType, dtype_name, simplify_dim
from lmforge.ir.verify import check_types

aten = torch.ops.aten
_INT64_MAX = 9223372036854775807


class _FunctionModule(torch.nn.Module):
    """Wraps a plain function over tensors so torch.export can take it."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn
        # torch.export records source lines of `forward` frames only: run the user's own code object under
        # that name, so each node's source line points into the user's function, not into a wrapper.
        code = getattr(fn, "__code__", None)
        if code is not None:
            self.forward = types.FunctionType(code.replace(co_name="forward"), fn.__globals__, "forward",
                                              fn.__defaults__, fn.__closure__)
        else:
            self.forward = fn


def _input_names(model, n: int) -> list[str]:
    fn = model.fn if isinstance(model, _FunctionModule) else model.forward
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"arg{i}" for i in range(len(names), n)]


def _check_inputs(example_inputs) -> tuple:
    if example_inputs is None:
        raise CaptureError("example_inputs are missing: a torch model is captured by running it on them; pass a "
                           "tuple of its positional inputs, e.g. lmforge.capture(model, (x,)) or "
                           "lmforge.compile(model, (x,)) (only an ONNX model or .onnx path needs none)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    for i, leaf in enumerate(pytree.tree_leaves(tuple(example_inputs))):
        if not isinstance(leaf, torch.Tensor):
            raise CaptureError(
                f"example input leaf {i} is a {type(leaf).__name__} ({leaf!r:.40}), not a tensor: lmforge captures "
                "functions of tensors. Pass it as a tensor, or bind it beforehand with functools.partial / a "
                "module attribute so it becomes a constant of the model.")
    return tuple(example_inputs)


def check_dynamic(names: list[str], inputs: tuple, dynamic) -> dict[str, dict[int, str]]:
    """`dynamic` checked against the inputs and normalized: {input name: {dim index >= 0: dim name}} (a negative
    index counts from the end, as in torch). Each mistake is a CaptureError that says what the spec should be."""
    if not dynamic:
        return {}
    form = 'a dict {input name: {dim index: dim name}}, e.g. {"tokens": {0: "batch", 1: "seq"}}'
    if not isinstance(dynamic, dict):
        raise CaptureError(f"dynamic must be {form}, got a {type(dynamic).__name__}")
    unknown = set(dynamic) - set(names)
    if unknown:
        raise CaptureError(f"dynamic names inputs {sorted(unknown, key=str)}, but the model's inputs are {names}")
    out: dict[str, dict[int, str]] = {}
    for name, x in zip(names, inputs):
        per = dynamic.get(name)
        if per is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"dynamic[{name!r}]: input {name!r} is a {type(x).__name__}, not a tensor; dynamic "
                               "dims can be given for tensor arguments only (pass the tensors of a dict or list as "
                               "arguments of their own to vary their sizes)")
        if not isinstance(per, dict):
            raise CaptureError(f"dynamic[{name!r}] is a {type(per).__name__}; dynamic must be {form}")
        entry = {}
        for d, sym in per.items():
            if isinstance(d, bool) or not isinstance(d, int):
                raise CaptureError(f"dynamic[{name!r}] has the key {d!r}: dims are given by their index (an int), "
                                   f"as in {form}")
            if not isinstance(sym, str) or not sym.isidentifier() or keyword.iskeyword(sym):
                raise CaptureError(f"dynamic[{name!r}] names dim {d} {sym!r}, which is not a Python identifier: "
                                   "lmforge writes sizes as expressions over dim names, so use letters, digits and "
                                   "_ (e.g. 'seq_len')")
            if not -x.dim() <= d < x.dim():
                raise CaptureError(f"dynamic[{name!r}] names dim {d}, but that input has shape {tuple(x.shape)}")
            d = d % x.dim()
            if d in entry and entry[d] != sym:
                raise CaptureError(f"dynamic[{name!r}] names dim {d} twice ({entry[d]!r} and {sym!r})")
            if x.shape[d] < 2:
                raise CaptureError(f"dynamic dim {sym!r} of input {name!r} is {x.shape[d]} in the example; "
                                   "torch.export specializes sizes 0 and 1: give an example size >= 2")
            entry[d] = sym
        out[name] = entry
    return out


def _dynamic_shapes(names: list[str], dynamic: dict[str, dict[int, str]]):
    """torch.export's dynamic_shapes for a checked spec: one torch.export.Dim per dim name."""
    if not dynamic:
        return None
    dims = {sym: torch.export.Dim(sym) for per in dynamic.values() for sym in per.values()}
    return tuple({d: dims[sym] for d, sym in dynamic[name].items()} if name in dynamic else None for name in names)


# torch.export's text that names its own tools (TORCH_LOGS, draft_export, mark_dynamic, Dim.STATIC) rather than
# lmforge's: cut from each line it appears on
_TORCH_ONLY = (" For more information, run with", " If you're using mark_dynamic", "The error above occurred when",
               " If this type holds tensors")


def _torch_explanation(text: str) -> list[str]:
    """torch's reasons, one per line, in lmforge's terms: the first line and the constraint lines ("Not all
    values of seq = x.shape[1] ... satisfy the generated guard ...", "... must always be equal"), with
    `L['x'].size()[1]` written as `x.shape[1]` (the dims already carry the user's names). torch's "Suggested
    fixes" are dropped: they are torch.export.Dim code; `_explain`'s hint says what to do in lmforge."""
    lines = []
    for line in text.split("Suggested fixes:")[0].splitlines():   # torch's fixes use torch.export.Dim
        for cut in _TORCH_ONLY:
            line = line.split(cut)[0]
        line = re.sub(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]", r"\1.shape[\2]", line.rstrip())
        line = re.sub(r"L\['(\w+)'\]", r"\1", line)
        if line.strip():
            lines.append(line.strip()[:400])
    return lines[:8]


def _upper_bound(text: str) -> tuple[str, int] | None:
    """(dim name, largest size) when torch's reason is a guard that bounds a named dim from above, as in
    "Not all values of seq = L['x'].size()[1] ... satisfy the generated guard 2 <= L['x'].size()[1] and
    L['x'].size()[1] <= 64"."""
    reasons = re.findall(r"Not all values of (\w+) = (\S+) in the specified range satisfy the generated guard (.*)",
                         text)
    for dim, size, guard in reasons:
        bound = re.search(re.escape(size) + r" (<=?) (\d+)", guard)
        if bound:
            largest = int(bound[2]) - (bound[1] == "<")
            excluded = {int(m[1]) for d, _, g in reasons
                        if d == dim and (m := re.fullmatch(re.escape(size) + r" != (\d+)\.?", g))}
            while largest in excluded:   # `seq <= 64` with `seq != 64`: up to 63
                largest -= 1
            return dim, largest
    return None


def _explain(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    hint = "Check that the model runs eagerly on the example inputs."
    low = text.lower()
    upper = _upper_bound(text)
    if "data-dependent" in low or "guardondatadependent" in low or "could not guard" in low:
        hint = ("The model branches on tensor values (data-dependent control flow). Make the branch depend on "
                "shapes or Python constants, use torch.cond, or capture each branch as its own model.")
    elif "must always be equal" in low:
        hint = ("The model needs two dims you named differently to be equal (e.g. it adds the tensors): give them "
                "the same name in `dynamic`.")
    elif "specialized" in low and "constant" in low:
        hint = ("A dimension marked dynamic is constant in the model: mark the same dim of every input that has it "
                "(e.g. the batch of both k_cache and v_cache; an unmarked one fixes the size for all), or remove "
                "it from `dynamic`, or use a size >= 2.")
    elif "in output, which is not a known type" in low or "in input, which is not a known type" in low:
        kind = re.search(r"<class '([\w.]+)'>", text)
        kind = kind.group(1) if kind else "an object"
        hint = (f"The model passes {kind} in or out, which lmforge cannot take apart into tensors. "
                "Hugging Face models: turn the cache off (config.use_cache = False, or call with use_cache=False) "
                "and pass caches as tensors; otherwise wrap the model in a function that takes and returns tensors "
                "(or tuples / dicts of them).")
    elif upper is not None:
        dim, size = upper
        hint = (f"The model works only up to {dim} = {size} (e.g. a table of max_position_embeddings positions), and "
                f"lmforge's dynamic dims have no upper bound. Make {dim} static (remove it from `dynamic`) or change "
                "the model so that it works for every size (e.g. a larger max_position_embeddings).")
    elif "not all values of" in low:
        hint = ("The model only works for some sizes of a dynamic dim: torch had to assume the condition above "
                "(a negative or stepped slice such as x[:, -2:], narrow or chunk on the dim often does this). "
                "Make that dim static (remove it from `dynamic`) or compute the slice from the size so that it "
                "holds for every size >= 2.")
    detail = "\n  ".join(_torch_explanation(text))
    return f"torch.export could not capture the model: {detail}\n{hint}"


def export_program(model, example_inputs, dynamic=None):
    """Run torch.export with lmforge's checks; returns (ExportedProgram, input names)."""
    inputs = _check_inputs(example_inputs)
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise CaptureError(f"capture takes a torch.nn.Module or a function, got {type(model).__name__}")
        try:
            inspect.signature(model)
        except (TypeError, ValueError):
            raise CaptureError(f"{getattr(model, '__name__', model)!r} is a builtin without a Python signature: "
                               "capture a Python function that calls it (e.g. lambda x: torch.exp(x))") from None
        model = _FunctionModule(model)
    names = _input_names(model, len(inputs))
    spec = check_dynamic(names, inputs, dynamic)
    try:
        ep = torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(names, spec), strict=False)
    except Exception as e:  # torch.export raises many exception types; all mean "could not capture"
        # a guard torch could not prove for named dims may still hold for every size (GQA's repeat_kv):
        # export_unnamed keeps its retry only if it proves that
        ep = export_unnamed(model, inputs, names, spec) if "not all values of" in str(e).lower() else None
        if ep is None:
            raise CaptureError(_explain(e)) from e
    return functional_program(ep), names


# ---- in-place writes ----------------------------------------------------------------------------------

def _is_mutating(target) -> bool:
    """An ATen op that writes to an argument (add_, copy_, fill_, index_put_, ...): its schema has a `Tensor(a!)`."""
    schema = getattr(target, "_schema", None)
    return schema is not None and schema.is_mutable


_STATE_WRITES = {"BUFFER_MUTATION": "buffer", "PARAMETER_MUTATION": "parameter", "USER_INPUT_MUTATION": "input"}


def functional_program(ep):
    """The exported program with its in-place writes made explicit, or `ep` itself when it has none.

    torch.export (strict=False) returns a graph that still writes in place: `y = x.clone(); y[:, -2:] = 0` is a
    `clone`, a `slice` view of it and a `fill_` on the view that nothing reads. lmforge's ops are pure (clone is
    the identity, dead nodes go), so such a write would be lost and an in-place fallback would run on the
    caller's tensor. Functionalization (`run_decompositions({})`) turns each write into a value (`slice_scatter`,
    `select_scatter`, `copy`, `add`, ...) that the later reads use. Only graphs with a write go through it: the
    graphs of ordinary models stay as exported, so the signatures that key their tuning studies do not change.

    A write to model state (a buffer such as a static KV cache, a parameter, a caller's input) has no meaning
    in a compiled function that keeps nothing between calls: a CaptureError says where it is and what to do.
    """
    writes = [n for n in ep.graph.nodes if n.op == "call_function" and _is_mutating(n.target)]
    if not writes:
        return ep
    try:
        with warnings.catch_warnings():   # torch's own deprecation notice from inside run_decompositions
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            functional = ep.run_decompositions({})
    except Exception as e:  # functionalization rejects some programs; say which write it could not express
        raise CaptureError(f"the model writes to tensors in place ({_where(writes)}) and torch could not rewrite "
                           f"those writes as values ({type(e).__name__}: {str(e).splitlines()[0][:300]}); write "
                           "the result to a new tensor instead (e.g. torch.where / torch.cat / x.clone() first)") from e
    for spec in functional.graph_signature.output_specs:
        kind = _STATE_WRITES.get(spec.kind.name)
        if kind is not None:
            raise CaptureError(_state_write_message(kind, spec.target, ep, writes))
    return functional


def _where(nodes) -> str:
    lines = list(dict.fromkeys(f"{n.target} at {_source(n) or 'an unknown line'}" for n in nodes))
    return "; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "")


def _state_write_message(kind: str, target: str, ep, writes) -> str:
    """What to do about a write to a buffer, a parameter or an input, with the user's lines that write it."""
    placeholder = {s.arg.name: s.target or s.arg.name for s in ep.graph_signature.input_specs}

    def base(n):  # the placeholder a write lands in, through views (cache[:, :3] is a slice of the buffer)
        n = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        while (n is not None and n.op == "call_function" and returns_view(n.target)
               and isinstance(n.args[0], torch.fx.Node)):
            n = n.args[0]
        return placeholder.get(n.name, n.name) if n is not None and n.op == "placeholder" else None

    mine = [n for n in writes if base(n) == target] or writes
    where = _where(mine)
    if kind == "input":
        return (f"the model writes to its input {target!r} in place ({where}); a compiled model never changes the "
                "caller's tensors. Write to a copy instead (x = x.clone() first) and return it as an output if "
                "the caller needs the new value.")
    extra = (" nn.Embedding(max_norm=...) renormalizes its weight on every call: renormalize the weight once "
             "before capturing and drop max_norm." if any("embedding_renorm" in str(n.target) for n in mine) else "")
    return (f"the model writes to its {kind} {target!r} in place ({where}), but a compiled lmforge model keeps no "
            f"state between calls, so the write would be lost. Pass the tensor as an input and return its new value "
            f"as an output (e.g. `return out, new_cache` for a KV cache).{extra}")


# ---- translation ----------------------------------------------------------------------------------

def _source(node) -> str:
    """`file.py:12 in forward`: the user's line that made an FX node (the innermost frame outside torch/lmforge)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)
    if not frames:
        return ""
    library_dirs = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    user = [f for f in frames if not f[0].startswith(library_dirs)] or frames
    path, line, fn = user[-1]
    return f"{os.path.basename(path)}:{line} in {fn}"


def _ir_dtype(dtype: torch.dtype) -> str:
    """The IR's name of a torch dtype; a CaptureError for the dtypes the IR does not have (complex, ...)."""
    try:
        return dtype_name(dtype)
    except ValueError:
        raise CaptureError(f"the model uses a {dtype} tensor, a dtype lmforge's IR does not have; compute in real "
                           "dtypes (e.g. RoPE with cos / sin tensors instead of complex numbers)") from None


class _Translator:
    def __init__(self, ep, names: list[str], graph_name: str):
        self.ep = ep
        self.b = GraphBuilder(graph_name)
        self.env: dict[str, Any] = {}  # fx node name -> Value | tuple of Values | symbolic dim | constant
        self.sym_names: dict[str, str] = {}
        self.user_names = names
        self.example_dims: dict[str, int] = {}

    # -- symbols
    def dim(self, d) -> Any:
        if isinstance(d, int):
            return d
        if isinstance(d, torch.SymInt):
            # one pass over the text: a user's name that is also a torch symbol ("s17") is never renamed again
            text = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: self.sym_names.get(m[0], m[0]), str(d.node.expr))
            return simplify_dim(text) if not text.isidentifier() else text
        return int(d)

    def ttype(self, val) -> TensorType:
        return TensorType(tuple(self.dim(d) for d in val.shape), _ir_dtype(val.dtype))

    def value(self, arg):
        if isinstance(arg, torch.fx.Node):
            return self.env[arg.name]
        return arg

    def source(self, node) -> str:
        return _source(node)

    # -- placeholders
    def bind_inputs(self):
        sig = self.ep.graph_signature
        kinds = {spec.arg.name: spec for spec in sig.input_specs}
        user_i = 0
        placeholders = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        # First pass: learn which torch symbols the user named (from the user inputs' example shapes).
        for n in placeholders:
            spec = kinds[n.name]
            if spec.kind.name == "USER_INPUT":
                val = n.meta.get("val")
                if isinstance(val, torch.Tensor):
                    for d, size in enumerate(val.shape):
                        if isinstance(size, torch.SymInt) and str(size.node.expr).isidentifier():
                            user = self.sym_names.setdefault(str(size.node.expr), self._user_dim_name(user_i, d, size))
                            hint = size.node.hint
                            if hint is not None:
                                self.example_dims.setdefault(user, int(hint))
                user_i += 1
        user_i = 0
        for n in placeholders:
            spec = kinds[n.name]
            val = n.meta.get("val")
            if spec.kind.name == "USER_INPUT":
                if not isinstance(val, torch.Tensor):
                    raise CaptureError(f"input {n.name} is not a tensor after export ({type(val).__name__})")
                name = self.user_names[user_i] if user_i < len(self.user_names) else n.name
                self.env[n.name] = self.b.input(name, self.ttype(val))
                user_i += 1
            else:
                target = spec.target
                tensor = self.ep.state_dict.get(target)
                if tensor is None:
                    tensor = self.ep.constants.get(target)
                if tensor is None:
                    raise CaptureError(f"parameter {target!r} has no value in the exported program")
                self.env[n.name] = self.b.param(target, TensorType(tuple(tensor.shape), _ir_dtype(tensor.dtype)),
                                            tensor.detach())

    def _user_dim_name(self, user_i: int, d: int, size) -> str:
        wanted = getattr(self, "dynamic", {}) or {}
        name = self.user_names[user_i] if user_i < len(self.user_names) else None
        return (wanted.get(name) or {}).get(d) or str(size.node.expr)

    # -- nodes
    def run(self) -> Graph:
        self.bind_inputs()
        for node in self.ep.graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                return self.finish(node)
        raise CaptureError("exported graph has no output")

    def call(self, node):
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool) and node.target is not operator.getitem:
            if isinstance(val, torch.SymInt):
                from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

                if free_unbacked_symbols(val):   # a value read from data (.item(), nonzero): not a size of an input
                    raise CaptureError(f"{node.target} at {self.source(node)} makes a size from tensor data "
                                       f"({val}, e.g. .item()): lmforge's sizes come from input shapes; pass the "
                                       "value as a Python int or derive it from a shape")
            self.env[node.name] = self.dim(val)  # shape arithmetic: folded into symbolic dims
            return
        if node.target in _DROPPED:
            return
        if node.target is operator.getitem:
            self.env[node.name] = self.value(node.args[0])[node.args[1]]
            return
        if _is_mutating(node.target):   # functional_program removed every write torch can express as a value
            raise CaptureError(f"{node.target} at {self.source(node) or 'an unknown line'} writes to a tensor in "
                               "place, which lmforge cannot represent (its ops are pure); compute the result as a "
                               "new tensor instead (e.g. y = x.add(1) rather than x.add_(1))")
        self.env[node.name] = self.translated(node)

    def translated(self, node):
        """The IR of one ATen node: its rule's nodes when their type rules give the types torch recorded for it,
        else a torch_fallback. A rule that holds for the usual case (cat of one dtype, a 2-D linear weight) can
        then never turn valid torch code into a graph that fails to verify: torch runs the unusual case."""
        rule = ATEN_TO_IR.get(node.target)
        mark = self.b.mark()
        try:
            out = rule(self, node) if rule is not None else None
            if out is not None:
                for n in self.b.nodes_since(mark):
                    check_types(n)
        except (VerifyError, IndexError, ValueError, TypeError, KeyError):
            # a type rule that cannot take these inputs, or disagrees with torch's types: torch runs the node
            self.b.rollback(mark)
            return self.fallback(node)
        if out is None:
            self.b.rollback(mark)
            return self.fallback(node)
        return out

    def emit(self, node, op: str, inputs, attrs=None, out_types=None):
        vals = node.meta.get("val")
        if out_types is None:
            leaves = vals if isinstance(vals, (tuple, list)) else [vals]
            out_types = [self.ttype(v) for v in leaves]
        return self.b.op(op, inputs, attrs or {}, name=node.name, source=self.source(node), out_types=out_types)

    def fallback(self, node):
        inputs: list[Value] = []

        def spec(a):
            if isinstance(a, torch.fx.Node):
                v = self.env[a.name]
                if isinstance(v, Value):
                    inputs.append(v)
                    return ("$input", len(inputs) - 1)
                if isinstance(v, str):
                    raise CaptureError(f"op {node.target} at {self.source(node)} takes a symbolic size "
                                       f"({v}) that lmforge cannot pass to a torch fallback yet; rewrite it "
                                       "with static sizes or open an issue")
                return v
            if isinstance(a, torch.dtype):
                return ("$dtype", dtype_name(a))
            if isinstance(a, torch.device):
                return ("$device", "")
            if isinstance(a, (list, tuple)):
                return ("$list", tuple(spec(x) for x in a))
            if isinstance(a, torch.layout) or isinstance(a, torch.memory_format):
                return None
            return a

        args = tuple(spec(a) for a in node.args)
        kwargs = tuple((k, spec(v)) for k, v in node.kwargs.items()
                       if k not in ("layout", "pin_memory", "memory_format"))
        vals = node.meta.get("val")
        leaves = vals if isinstance(vals, (tuple, list)) else [vals]
        if not all(isinstance(v, torch.Tensor) for v in leaves):
            raise CaptureError(f"op {node.target} at {self.source(node)} returns non-tensor values; lmforge "
                               "cannot represent it")
        out = self.b.op("torch_fallback", inputs, {"target": _target_name(node.target), "args": args,
                                                   "kwargs": kwargs},
                        name=node.name, source=self.source(node), out_types=[self.ttype(v) for v in leaves])
        return out

    def finish(self, node) -> Graph:
        outs = []
        for a in pytree.tree_leaves(node.args[0]):
            v = self.value(a)
            if not isinstance(v, Value):
                raise CaptureError(f"the model returns a non-tensor value ({v!r}); return tensors only")
            outs.append(v)
        out_spec = builtin_structure(self.ep.call_spec.out_spec)
        meta = {"out_spec": pytree.treespec_dumps(out_spec) if out_spec is not None else None,
                "captured_from": "torch.export", "example_dims": self.example_dims,
                "arg_names": list(self.user_names)}
        in_spec = self.ep.call_spec.in_spec
        if in_spec is not None:
            args_kwargs = plain_containers(pytree.tree_unflatten(range(in_spec.num_leaves), in_spec))
            if in_spec.num_leaves != len(args_kwargs[0]):
                # inputs in containers (a dict of tensors): calls are matched to this structure, dicts by key
                meta["in_spec"] = pytree.treespec_dumps(pytree.tree_structure(args_kwargs))
        return self.b.build(outs, meta)


def plain_containers(o):
    """`o` with dicts (and dict subclasses) as dicts and lists, tuples and named tuples as tuples: the structure
    a call's inputs are matched against (a list where the model was captured with a tuple is the same input)."""
    if isinstance(o, dict):
        return {k: plain_containers(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return tuple(plain_containers(v) for v in o)
    return o


def builtin_structure(spec):
    """The output structure with Python's own containers only: a named tuple (torch.return_types.topk, a user's
    namedtuple) becomes a tuple, a dict subclass (a Hugging Face ModelOutput) a dict with the same keys in the same
    order. A compiled or exported model then returns those, and an artifact loads in a process that never imported
    the model's classes (pytree cannot serialize or load them there)."""
    if spec is None:
        return None

    def plain(o):
        if isinstance(o, dict):
            return {k: plain(v) for k, v in o.items()}
        if isinstance(o, (tuple, list)):
            return type(o)(plain(x) for x in o) if type(o) in (tuple, list) else tuple(plain(x) for x in o)
        return o

    leaves = list(range(spec.num_leaves))
    out = pytree.tree_structure(plain(pytree.tree_unflatten(leaves, spec)))
    if out.num_leaves != spec.num_leaves or pytree.tree_leaves(pytree.tree_unflatten(leaves, out)) != leaves:
        raise CaptureError(f"cannot express the model's output structure {spec} with tuples, lists and dicts; "
                           "return tensors in tuples, lists or dicts")
    return out


def _target_name(target) -> str:
    """`torch.ops.aten.triu.default` -> `"aten.triu.default"` (resolved again by `resolve_aten`)."""
    return str(target)


_DROPPED = {
    aten._assert_scalar.default, aten.sym_constrain_range_for_size.default, aten._assert_tensor_metadata.default,
    aten.sym_constrain_range.default,
}
if hasattr(aten, "_assert_async"):
    _DROPPED |= {aten._assert_async.msg}


def capture(model, example_inputs=None, dynamic: dict | None = None, name: str | None = None,
            recognize: bool = True) -> Graph:
    """Capture a torch.nn.Module or a function of tensors (or an ONNX model / .onnx path) into a verified graph.

    `dynamic` maps input names to {dim index: symbol name}, e.g. {"tokens": {0: "batch", 1: "seq"}};
    inputs sharing a symbol name share the dimension. `name`: the graph's name (default: the model's class or
    function name). `recognize`: fold decomposed attention (softmax(q k^T) v, with or without a mask) into
    `attention` ops, as the passes expect (False keeps the ops as captured). Raises CaptureError with the cause and
    what to try.
    """
    from lmforge.ir.verify import verify
    from lmforge.passes.canonical import recognize_attention

    if type(model).__module__.startswith("onnx") or (isinstance(model, (str, os.PathLike))
                                                     and str(model).endswith(".onnx")):
        from lmforge.ir.frontends.onnx_import import import_onnx

        return verify(import_onnx(model))
    ep, names = export_program(model, example_inputs, dynamic)
    gname = name or type(model.fn if isinstance(model, _FunctionModule) else model).__name__
    if not isinstance(model, torch.nn.Module):
        gname = name or getattr(model, "__name__", "function")
    t = _Translator(ep, names, gname)
    t.dynamic = check_dynamic(names, tuple(example_inputs) if isinstance(example_inputs, (tuple, list))
                              else (example_inputs,), dynamic)
    graph = t.run()
    if recognize:
        graph = recognize_attention(graph)
    return verify(graph)

