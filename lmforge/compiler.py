"""`lmforge.compile`: capture (or take) a graph, run the pass pipeline, assign backends, generate code.

    compiled = lmforge.compile(model, (tokens,), target="host")
    logits = compiled(tokens)          # same output structure as model(tokens)
    print(compiled.inspect())          # the graph, who runs each node, and its cost
"""
from __future__ import annotations

import functools

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from lmforge.backends import assign_kernels, default_backends
from lmforge.backends.codegen import generate
from lmforge.errors import LmforgeError
from lmforge.ir.graph import Graph, Node


class CompiledModel:
    """A graph, its weights, and generated code that runs it; callable like the captured model."""

    config_source: dict | None = None  # config="best": {"study", "trial"} the config came from (see `compile`)
    objectives: dict | None = None  # config="best": its trial's predicted / measured numbers (trial_objectives)

    def __init__(self, graph: Graph, backends: Sequence = (), device: str | torch.device = "cpu",
                 target: str = "host", config: Mapping[str, Any] | None = None, pass_report: str = ""):
        if graph.get_meta("tensor_parallel") and graph.get_meta("tensor_parallel_rank") is None:
            raise LmforgeError(f"graph {graph.name!r} is split over tensor-parallel ranks: run it with "
                               "lmforge.backends.collectives.TensorParallelModel (lmforge.compile does)")
        self.graph = graph
        self.target = target
        self.config = dict(config or {})
        self.pass_report = pass_report
        self.device = torch.device(device)
        self.backends = list(backends) or default_backends()
        self.weights = {k: w.to(self.device) for k, w in graph.weights.items()}
        self._fn, self.kernels = build_callable(graph, self.backends, self.device.type, self.weights)
        self._out_spec = output_structure(graph)

    @property
    def source(self) -> str:
        """The generated Python code (one line per node)."""
        return self._fn.__lmforge_source__

    def __call__(self, *args, **kwargs):
        leaves = input_leaves(self.graph, args, kwargs)
        outs = self._fn(*leaves)
        if self._out_spec is None:
            return outs[0] if len(outs) == 1 else outs
        return pytree.tree_unflatten(list(outs), self._out_spec)

    def add_gpu_kernels(self, targets=("h100",), backends=("tvm", "triton")) -> dict[str, list[str]]:
        """Generate the GPU kernels of this graph for each target (no GPU needed) and keep them for export.

        backends: which producers run, each into its own folder of the artifact's `kernels/<target>/`:
          "tvm"     the TVM backend's CUDA source, one `.cu` per distinct kernel plus `kernels.json` (which
                    nodes each file serves, which stay with the reference), under `tvm-cuda/`;
          "triton"  ahead-of-time Triton builds for the target's arch of every node the Triton backend
                    claims on a GPU: `<name>.ptx`, `<name>.cubin`, `<name>.json` (launch metadata) and
                    `index.json`, under `triton/` (see lmforge.backends.triton.artifact_kernels). The kernel
                    configs are the Triton backend's (`TritonBackend(config)` among this model's backends),
                    else each kernel's default. `lmforge.load(path, device="cuda")` launches these cubins on
                    a GPU of that arch.
        Returns {target: [file names]}: the TVM files by name (`kernels.json`, `*.cu`) and the Triton files as
        `triton/<file>`.
        """
        from lmforge.hwmodels import get_target

        unknown = set(backends) - {"tvm", "triton"}
        if unknown:
            raise LmforgeError(f"add_gpu_kernels backends must be among 'tvm', 'triton', not {sorted(unknown)}")
        self.kernel_files = dict(getattr(self, "kernel_files", {}) or {})
        archs = {}
        for name in targets:
            archs[name] = get_target(name).arch
            if not archs[name].startswith("sm_"):
                raise LmforgeError(f"target {name!r} ({archs[name]}) is not a CUDA GPU; GPU kernels need e.g. h100 "
                                   "or a100")
        triton_files = {}
        if "triton" in backends and archs:  # one build batch for every target
            from lmforge.backends.triton.artifact_kernels import build_for_targets

            triton_files = build_for_targets(self.graph, archs, self._triton_configs())
        added = {}
        for name, arch in archs.items():
            files, listed = {}, []
            if "tvm" in backends:
                from lmforge.backends.tvm import TVMBackend

                sources = TVMBackend.cuda_sources(self.graph, arch, {k: v for k, v in self.config.items()
                                                                     if k.startswith("tvm.")})
                files.update({f"tvm-cuda/{f}": text.encode() for f, text in sources.items()})
                listed += sorted(sources)
            for f, data in sorted(triton_files.get(name, {}).items()):
                files[f"triton/{f}"] = data
                listed.append(f"triton/{f}")
            self.kernel_files[name] = files
            added[name] = listed
        return added

    def _triton_configs(self) -> dict:
        """The kernel configs of this model's Triton backend (name -> KernelConfig), empty when it has none."""
        for backend in self.backends:
            if getattr(backend, "name", None) == "triton":
                return dict(getattr(backend, "config", {}) or {})
        return {}

    def use_cuda_graphs(self, max_graphs: int = 8) -> "CompiledModel":
        """Replay the generated code as CUDA graphs (one per input shape); see lmforge.backends.cuda_graphs."""
        from lmforge.backends.cuda_graphs import CUDAGraphRunner

        if self.device.type != "cuda":
            raise LmforgeError("use_cuda_graphs needs the model on a CUDA device: call .to('cuda') first")
        self._fn = CUDAGraphRunner(self._fn, max_graphs)
        return self

    def to(self, device) -> "CompiledModel":
        moved = CompiledModel(self.graph, self.backends, device, self.target, self.config, self.pass_report)
        moved.config_source, moved.objectives = self.config_source, self.objectives
        return moved

    def inspect(self, target: str | None = None, show_costs: bool = True) -> str:
        """The graph with, per node, the backend that runs it and (when a target is known) its predicted cost.

        target: the hardware to price the nodes on (default: the one the model was compiled for); show_costs=False
        leaves the costs out."""
        from lmforge.inspect import inspect_graph

        return inspect_graph(self.graph, self.kernels, target=target or self.target if show_costs else None)

    def fallback_nodes(self) -> list[Node]:
        return [n for n in self.graph.nodes if n.op == "torch_fallback"]

    def export(self, path, **kwargs):
        """Write this model as an artifact directory at `path` (manifest, graph, weights, ONNX, kernels); see
        `lmforge.exporting.export` for the keyword arguments. Returns the path; `lmforge.load(path)` reads it."""
        from lmforge.exporting import export

        return export(self, path, **kwargs)


def ineffective_knobs(graph: Graph, config: Mapping[str, Any]) -> list[str]:
    """Warnings for knobs a config sets that changed (part of) the graph less than asked: weight-only bits that
    quantized nothing, or skipped linears whose input size the group size does not divide, attention patterns that
    found no attention they apply to (e.g. attention whose mask reads an attention_mask input)."""
    out = []
    bits, group = config.get("quant.weight_bits", 16), config.get("quant.group_size", 128)
    if isinstance(bits, int) and bits < 16 and isinstance(group, int) and group > 0:
        skipped = sorted({int(n.inputs[1].type.shape[1]) for n in graph.nodes if n.op == "linear" and
                          isinstance(n.inputs[1].type.shape[-1], int) and n.inputs[1].type.shape[1] % group})
        done = sum(n.op == "linear_wo" for n in graph.nodes)
        if not skipped and not done:
            out.append(f"quant.weight_bits={bits} quantized no layer: weight-only quantization applies to linear "
                       "layers whose weight is a parameter (a matmul by a parameter counts), and not to the one "
                       "whose output is the model's output unless quant.lm_head=True; this model has "
                       f"{sum(n.op == 'linear' for n in graph.nodes)} linear layer(s) left")
        if skipped:
            out.append(f"quant.weight_bits={bits} left linear layers with input sizes {skipped} unquantized (they "
                       f"are not multiples of quant.group_size={group}; {done} were quantized): choose a group size "
                       "that divides them")
    patterns = {k: config.get(k, "dense") for k in ("attn.decode_pattern", "attn.prefill_pattern")}
    asked = {k: v for k, v in patterns.items() if v != "dense"}
    sparse = any(n.op in ("block_topk_attention", "flex_prefill_attention", "block_sparse_attention") or
                 (n.op == "attention" and n.attr.get("window") is not None) for n in graph.nodes)
    if asked and not sparse:
        out.append(f"{', '.join(f'{k}={v!r}' for k, v in asked.items())} changed no attention node: the sparsity "
                   "passes rewrite mask-free attention (causal prefill, decode over a KV cache; a mask built from "
                   "sizes that is provably causal counts as none); this graph's attention takes another explicit "
                   "mask (e.g. one read from an attention_mask input) or is not of that form")
    return out


def check_knob_names(config: Mapping[str, Any], knobs) -> None:
    """LmforgeError for a config key that is no knob of the pipeline (a misspelled knob would silently do nothing).
    Per-layer-group copies (`name@g0`) and the Triton kernel knobs (`triton.<template>`, named per graph) pass."""
    import difflib

    names = {k.name for k in knobs} | {"shard.tp"}
    unknown = [key for key in config if key.split("@")[0] not in names and not key.startswith("triton.")]
    if unknown:
        hints = {key: difflib.get_close_matches(key.split("@")[0], sorted(names), n=1) for key in unknown}
        said = ", ".join(f"{key!r}" + (f" (did you mean {hints[key][0]!r}?)" if hints[key] else "") for key in unknown)
        raise LmforgeError(f"config has no knob {said}; the pipeline's knobs are {sorted(names)}")
    by_name = {k.name: k for k in knobs}
    for key, value in config.items():
        knob = by_name.get(key.split("@")[0])
        if knob is not None and not knob_value_ok(knob, value):
            raise LmforgeError(f"config {key}={value!r} is not a value knob {knob.name} can take ({knob.describe()})")


def knob_value_ok(knob, value) -> bool:
    """Whether `value` is one a knob can take: one of the choices for a knob of named choices ("window") or a
    bool knob; for a knob of numeric choices any int from the smallest sensible value up (values outside the
    search's choices are allowed: a decode window of 8 is a window), a number for a float knob."""
    choices = tuple(knob.choices)
    if knob.kind == "bool":
        return isinstance(value, bool)
    if choices and (knob.closed or all(isinstance(c, str) for c in choices)):
        return not isinstance(value, bool) and value in choices
    if choices:
        least = 0 if min(choices) <= 0 else 1
        return isinstance(value, int) and not isinstance(value, bool) and value >= least
    if knob.kind == "float":   # low..high is the search's range, not the only valid one
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def output_structure(graph: Graph):
    """The pytree structure of the model's outputs (None: a flat tuple), as recorded at capture."""
    spec = graph.get_meta("out_spec")
    if not spec:
        return None
    try:
        return pytree.treespec_loads(spec)
    except Exception as e:  # pytree raises several types for a class this process has not registered
        raise LmforgeError(f"{graph.name}'s outputs are a structure of a class this process does not know ({e}); "
                           "import the library that defines it before loading, or re-export the model with this "
                           "lmforge version (it records outputs as tuples, lists and dicts)") from None


def input_leaves(graph: Graph, args, kwargs, types=None) -> list:
    """The tensors of a call, flattened in the graph's input order (keyword arguments bound by name); LmforgeError
    when they do not fit the graph's inputs (count, rank, dtype, static sizes, one size per symbolic dim).
    `types`: the input types to check against, when not the graph's own (a split graph takes whole tensors)."""
    from lmforge.ir.types import dtype_name

    call = (bind_arguments(graph, args, kwargs), {})
    spec = graph.get_meta("in_spec")
    if spec is None:
        nested = [i for i, a in enumerate(call[0]) if isinstance(a, (list, tuple, dict))]
        if nested and graph.get_meta("captured_from") == "torch.export":
            raise LmforgeError(f"{graph.name} was captured with tensor arguments, but argument {nested[0]} is a "
                               f"{type(call[0][nested[0]]).__name__}: pass each tensor as its own argument")
        leaves = pytree.tree_leaves(call)
    else:   # inputs in containers: matched to the captured structure (a dict by its keys, in any order)
        from lmforge.ir.frontends.torch_export import plain_containers

        try:
            leaves = _treespec(spec).flatten_up_to(plain_containers(call))
        except ValueError as e:
            like = pytree.tree_unflatten(["T"] * _treespec(spec).num_leaves, _treespec(spec))[0]
            raise LmforgeError(f"{graph.name}'s inputs do not have the structure it was captured with, "
                               f"{like!r} (T: a tensor): {e}") from None
    if len(leaves) != len(graph.inputs):
        raise LmforgeError(f"{graph.name} takes {len(graph.inputs)} tensor inputs "
                           f"({[v.name for v in graph.inputs]}), got {len(leaves)}")
    sizes: dict[str, tuple[int, str]] = {}
    for leaf, v, t in zip(leaves, graph.inputs, types or [v.type for v in graph.inputs]):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() != t.rank or dtype_name(leaf.dtype) != t.dtype:
            got = f"{dtype_name(leaf.dtype)} {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else \
                type(leaf).__name__
            raise LmforgeError(f"input {v.name!r} must be a tensor of type {t}, got {got}")
        for d, (want, size) in enumerate(zip(t.shape, leaf.shape)):
            if isinstance(want, int) and want != size:
                raise LmforgeError(f"input {v.name!r} must have size {want} in dim {d} (type {t}), got "
                                   f"{tuple(leaf.shape)}; capture the model with that dim dynamic to vary it")
            if isinstance(want, str) and want.isidentifier():
                seen = sizes.setdefault(want, (size, v.name))
                if seen[0] != size:
                    raise LmforgeError(f"dim {want!r} is {seen[0]} in input {seen[1]!r} but {size} in input "
                                       f"{v.name!r}: the graph's inputs must agree on it")
    return leaves


@functools.lru_cache(maxsize=64)
def _treespec(dumped: str):
    return pytree.treespec_loads(dumped)


def bind_arguments(graph: Graph, args, kwargs) -> tuple:
    """The call's arguments in the captured model's order: keyword arguments bound by name (the model's argument
    names, recorded at capture; else the graph's input names)."""
    if not kwargs:
        return tuple(args)
    names = list(graph.get_meta("arg_names") or [v.name for v in graph.inputs])
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise LmforgeError(f"{graph.name} has no input named {unknown}: its inputs are {names}")
    twice = [k for k in kwargs if names.index(k) < len(args)]
    if twice:
        raise LmforgeError(f"input(s) {twice} given both by position and by name")
    missing = [k for k in names[len(args):] if k not in kwargs]
    if missing:
        raise LmforgeError(f"{graph.name} needs input(s) {missing} (its inputs are {names})")
    return tuple(args) + tuple(kwargs[k] for k in names[len(args):])


def build_callable(graph: Graph, backends, device: str, weights: Mapping[str, Any]):
    """Generated code for `graph` (and, recursively, for the regions of its nodes) -> (fn, kernels)."""
    kernels = assign_kernels(graph, backends, device)
    region_fns = {}
    for i, node in enumerate(graph.nodes):
        if node.regions:
            region_fns[i] = tuple(region_callable(r, backends, device, weights) for r in node.regions)
    return generate(graph, kernels, dict(weights), region_fns), kernels


def region_callable(region: Graph, backends, device: str, weights: Mapping[str, Any]):
    """The callable of a region whose weights live in the outer graph's `weights`: generated code, or, for a region
    split over ranks (lmforge.passes.shard.tensor_parallel_regions), its ranks as a TensorParallelModel (whole
    tensors in and out, the ranks as threads of this process)."""
    from lmforge.passes.shard import plan_of

    if plan_of(region) is None:
        return build_callable(region, backends, device, weights)[0]
    from lmforge.backends.collectives import TensorParallelModel
    from lmforge.ir.graph import region_params

    names = {p.name for p in (*region.params, *region_params(region))}
    return TensorParallelModel(replace(region, weights={k: w for k, w in weights.items() if k in names}), backends,
                               device)


def compile(model, example_inputs=None, *, target: str = "host", dynamic: dict | None = None,
            config: Mapping[str, Any] | None = None, backends: Sequence[str] = ("torch",),
            device: str | None = None, passes=None, calibration: Sequence[tuple] | None = None,
            storage: str | None = None, study: str | None = None) -> CompiledModel:
    """Capture `model` (a torch module/function, or an IR Graph), run the pass pipeline, return a CompiledModel.

    example_inputs: a tuple of the model's positional inputs to capture it with (not for a Graph).
    target:      the hardware the configuration is for ("host", "h100", ...); costs in `inspect()` use it.
    dynamic:     {input name: {dim index: symbol}}: the dims that may vary between calls (as `lmforge.capture`).
    config:      knob values for the passes (from `lmforge.tune`), or "best" to look the best one up.
    backends:    backend names in priority order; the torch reference always runs what others leave.
    device:      where the compiled model runs (default: where its weights are, or "cpu").
    passes:      the pass pipeline (default: the canonical passes, then `lmforge.passes.tunable_pipeline`).
    calibration: input tuples for the passes that need activations (AWQ with quant.awq, FlexPrefill's measured
                 density); `lmforge.tune` uses the workload's first eval inputs.
    storage:     with config="best", the Optuna storage URL `tune` wrote to (default: the SQLite database in the
                 lmforge cache).
    study:       with config="best", the study to take the best config of (its name or a unique part of it, as
                 `lmforge report` lists them); default: the most recently run study of this model and target.
    config="best" takes the config `tune` reported as best in that study (`lmforge.search.studies.tuned_config`);
    the returned model's `config_source` says which study and trial it came from (None for other configs), and
    `export` records it in the manifest.
    """
    import warnings

    from lmforge.ir.frontends.torch_export import capture
    from lmforge.passes import PassManager, canonical_pipeline, tunable_pipeline

    if target != "host":
        from lmforge.hwmodels import get_target

        get_target(target)   # an unknown target is an error now, not at inspect() or export
    graph = model if isinstance(model, Graph) else capture(model, example_inputs, dynamic=dynamic)
    source = objectives = None
    if config == "best":
        from lmforge.search import studies

        graph = PassManager(canonical_pipeline()).run(graph)
        url = storage or studies.default_storage()
        store = studies.open_storage(url, must_exist=storage is not None)
        chosen = studies.tuned_config(graph, target, store, url, study=study)
        for name, why in chosen["passed_over"]:
            warnings.warn(f"config='best': the more recently run study {name} has no best config ({why}); took "
                          f"the best of study {chosen['study']}", stacklevel=2)
        config, source = chosen["config"], {"study": chosen["study"], "trial": chosen["trial"]}
        objectives = chosen["objectives"]
        passes = tunable_pipeline(calibration) if passes is None else passes
    elif storage is not None or study is not None:
        which = "storage= is where" if storage is not None else "study= names the study in which"
        raise LmforgeError(f"{which} config='best' is looked up; pass config='best' with it")
    elif config is not None and not isinstance(config, Mapping):
        raise LmforgeError(f"config must be a dict of knob values or 'best', not {type(config).__name__}")
    passes = list(passes if passes is not None else canonical_pipeline() + tunable_pipeline(calibration))
    if calibration is None and passes and isinstance(config, Mapping) and (
            config.get("quant.awq") or config.get("attn.prefill_pattern") == "flex"):
        warnings.warn("quant.awq / FlexPrefill need calibration inputs to act (AWQ's scales, the measured density): "
                      "pass lmforge.compile(..., calibration=[inputs, ...])", stacklevel=2)
    tp = (config or {}).get("shard.tp", 1)
    if tp != 1 and not any(p.name == "tensor_parallel" for p in passes):  # a tuned multi-GPU config
        from lmforge.passes.shard import tensor_parallel_pass

        passes.append(tensor_parallel_pass(max_tp=tp))
    pm = PassManager(passes)
    if isinstance(config, Mapping):
        from lmforge.backends.tvm.knobs import KNOBS as TVM_KNOBS

        check_knob_names(config, [*pm.knobs(), *TVM_KNOBS])
    graph = pm.run(graph, config)
    for message in ineffective_knobs(graph, config or {}):
        warnings.warn(message, stacklevel=2)
    chosen = default_backends(tuple(dict.fromkeys([*backends, "torch"])))
    tvm_knobs = {k: v for k, v in (config or {}).items() if k.startswith("tvm.")}
    if tvm_knobs:   # the TVM kernels' knobs (schedules): the CPU backend takes them, as add_gpu_kernels does
        from lmforge.backends.tvm import TVMBackend

        chosen = [TVMBackend(tvm_knobs) if getattr(b, "name", "") == "tvm" else b for b in chosen]
    dev = device or ("cpu" if not graph.weights else next(iter(graph.weights.values())).device)
    if graph.get_meta("tensor_parallel"):  # a `shard.tp` > 1 config: the ranks, as threads of this process
        from lmforge.backends.collectives import TensorParallelModel

        compiled = TensorParallelModel(graph, chosen, dev, target, config, pm.report())
    else:
        compiled = CompiledModel(graph, chosen, dev, target, config, pm.report())
    compiled.config_source, compiled.objectives = source, objectives
    return compiled
