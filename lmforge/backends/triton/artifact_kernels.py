"""Triton kernels in artifacts: AOT builds at export (`build_for_targets`) and the backend that launches them
after `lmforge.load(path, device="cuda")` (`load_kernels` -> `CubinBackend`).

Export (no GPU needed), for each target's architecture (sm_80 / sm_89 / sm_90):

1. every graph node the Triton backend would claim on a GPU gets its launch spec (launch_specs.py): the
   kernel variants it may launch, specialised from the graph's static types, with the configured
   KernelConfig (TritonBackend.config, else each kernel's default) adapted as the JIT launcher adapts it;
2. identical variants of different nodes are built once; the builds of every target run in one
   `aot.build_many` batch (one subprocess when the caller runs Triton's interpreter), as portable builds
   (aot.BuildRequest.portable: PTX ISA 8.7 assembled by a CUDA 12 ptxas, so that CUDA 12 drivers load the
   cubins whatever Triton exports them);
3. a build that fails or exceeds the architecture's limits (ptxas registers, shared memory, threads) is
   rebuilt with the kernel's default config, noted in the index; if that fails too the variant is listed
   under "failed" with the reason and its calls run the torch reference;
4. the files: `<name>.ptx`, `<name>.cubin`, `<name>.json` per kernel (aot.save: launch metadata, Triton's
   own metadata, ptxas resources, PTX ISA and ptxas CUDA version, sha256 of both binaries, plus the grid
   rule) and `index.json`: which nodes each kernel serves, which nodes stay with the reference and why.

Load: `load_kernels(index, files)` first compares the CUDA driver's version with the CUDA version of the
ptxas that built each cubin (`check_driver`: a driver of an older CUDA major version cannot load them; it
raises DriverTooOld, which lmforge.load turns into a warning and the torch reference, or an error under
kernels="required"; records without a ptxas version, from older exports, are not checked), then loads every
cubin on the current GPU (cubin_runner.CubinKernel) into a `CubinBackend`, which claims the nodes the index
lists. Each call asks the launch spec for its steps: one launch for the row kernels, SwiGLU and the
quantized linear; several for the attention ops (split-K decode: split, merge; flash prefill; block top-k:
score, a torch top-k, sparse split, merge; shared prefix: prefix split, suffix split, merge; block-sparse
prefill: the mask's block lists in torch, then flash prefill in SPARSE mode). Every launch's
specialisation is checked first (a built variant, alignment, divisibility; launch_specs.check_values); then
the steps run in order. A call with any launch outside what was built (e.g. an unaligned view, a variant
that failed to build) runs the torch reference as a whole.

Served ops: rmsnorm, layernorm, softmax, fused (SwiGLU, and other elementwise regions with the kernel generated
from the region, whose record carries that kernel's source: imported at load only when it equals what this
lmforge generates from graph.json's region, `check_generated_sources`), linear_wo, attention, block_topk_attention,
shared_prefix_attention, block_sparse_attention (as far as the Triton backend claims them); the index lists
any other claimed node under "not_served" with the reason.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from typing import Any, Mapping

from lmforge.backends.codegen import Kernel
from lmforge.backends.triton import aot
from lmforge.backends.triton import launch_specs as ls
from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import ArtifactError, LmforgeError
from lmforge.ir.graph import Graph, Node

INDEX = "index.json"
INDEX_SCHEMA = 1


def _node_id(i: int, node: Node) -> dict:
    return {"node": i, "op": node.op, "output": node.outputs[0].name if node.outputs else None}


def _variant_hash(v: ls.Variant, arch: str) -> str:
    raw = getattr(v.fn, "fn", v.fn)
    key = json.dumps([raw.__module__, raw.__qualname__, arch, sorted(v.signature.items()),
                      sorted((k, str(x)) for k, x in v.constexprs.items()), v.config.to_dict(),
                      sorted(v.divisible_by_16)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _request(v: ls.Variant, arch: str, name: str) -> aot.BuildRequest:
    return aot.BuildRequest(v.fn, dict(v.signature), dict(v.constexprs), v.config, arch, v.divisible_by_16, name,
                            portable=True)


def _portable(meta: dict) -> dict:
    """Triton's metadata without the build machine's file paths (extern_libs keep their file names only)."""
    meta = dict(meta)
    if meta.get("extern_libs"):
        meta["extern_libs"] = [[lib, str(path).rsplit("/", 1)[-1]] for lib, path in meta["extern_libs"]]
    return meta


def _fit_reason(result, arch: str) -> str | None:
    """Why a build result cannot be used on `arch` (it failed, or it exceeds the limits), else None."""
    if isinstance(result, str):
        return f"does not compile: {result.splitlines()[0][:300]}"
    reasons = aot.violations(aot.ResourceReport.of(result), aot.arch_limits(arch))
    return "; ".join(reasons) or None


def plan_for_graph(graph: Graph, arch: str, configs: Mapping[str, KernelConfig] | None = None):
    """What to build for `graph` on `arch`, without building: (served, not_served, variants).

    served: [{"node", "op", "output", "variants": {variant key: kernel name}}] for the nodes the Triton backend
    claims on a GPU and a launch spec covers; not_served: the other claimed nodes, each with its reason;
    variants: kernel name -> (variant with the configured config, the same variant with the default config).
    """
    from lmforge.backends.triton.backend import TritonBackend

    configs = dict(configs or {})
    claims = TritonBackend(configs)
    aot.arch_limits(arch)
    variants: dict[str, tuple[ls.Variant, ls.Variant]] = {}
    served, not_served = [], []
    for i, node in enumerate(graph.nodes):
        if claims.claim(node, "cuda") is None:
            continue
        try:
            spec = ls.spec_for(node)
            configured = spec.variants(node, configs)
            defaults = {v.key: v for v in spec.variants(node, {})}
        except ls.Unservable as exc:
            not_served.append({**_node_id(i, node), "reason": str(exc)})
            continue
        names = {}
        for v in configured:
            name = f"{v.kernel}_{_variant_hash(v, arch)}"
            variants.setdefault(name, (v, defaults.get(v.key, v)))  # a variant only the config has: no retry
            names[v.key] = name
        served.append({**_node_id(i, node), "variants": names})
    return served, not_served, variants


def variant_metadata(v: ls.Variant) -> dict:
    """The launch fields of a variant as its <name>.json records them (what CubinBackend reads)."""
    raw = getattr(v.fn, "fn", v.fn)
    arg_names = list(getattr(v.fn, "arg_names", None) or raw.__code__.co_varnames[:raw.__code__.co_argcount])
    return {"module": raw.__module__, "qualname": raw.__qualname__, "arg_names": arg_names,
            "signature": dict(v.signature), "divisible_by_16": sorted(v.divisible_by_16),
            "constexprs": {**{k: aot._jsonable(x) for k, x in v.constexprs.items()},
                           **{k: x for k, x in v.config.params if k in arg_names}},
            "config": v.config.to_dict(), "grid": json.loads(json.dumps(v.grid)), "static": dict(v.static),
            "variant": v.key, **_generated_source(v)}


def _generated_source(v: ls.Variant) -> dict:
    """{"source": ...} for a kernel generated from the graph (elementwise.py), so a machine that never generated
    it imports it from the record at load; {} for the kernels of lmforge's own modules."""
    from lmforge.backends.triton import elementwise

    source = elementwise.source_of(v.fn)
    return {} if source is None else {"source": source}


def build_for_graph(graph: Graph, arch: str, configs: Mapping[str, KernelConfig] | None = None,
                    target: str | None = None) -> dict[str, bytes]:
    """The Triton files of `graph` for `arch` ({relative path: bytes}, to go under kernels/<target>/triton/)."""
    return build_for_targets(graph, {target or arch: arch}, configs)[target or arch]


def build_for_targets(graph: Graph, archs: Mapping[str, str],
                      configs: Mapping[str, KernelConfig] | None = None) -> dict[str, dict[str, bytes]]:
    """`build_for_graph` for several targets ({target: arch}) with one build batch (and one retry batch)."""
    plans = {t: plan_for_graph(graph, arch, configs) for t, arch in archs.items()}
    jobs = [(t, n) for t, (_, _, variants) in plans.items() for n in sorted(variants)]
    results = dict(zip(jobs, aot.build_many(_request(plans[t][2][n][0], archs[t], n) for t, n in jobs)))
    retry = {job: reason for job in jobs if (reason := _fit_reason(results[job], archs[job[0]]))}
    retried = [(t, n) for t, n in retry if plans[t][2][n][1].config != plans[t][2][n][0].config]
    for job, result in zip(retried, aot.build_many(_request(plans[t][2][n][1], archs[t], n) for t, n in retried)):
        results[job] = result
    return {t: _files(t, archs[t], *plans[t], {n: results[(t, n)] for n in plans[t][2]},
                      {n: r for (t2, n), r in retry.items() if t2 == t}, {n for t2, n in retried if t2 == t})
            for t in archs}


def _files(target, arch, served, not_served, variants, results, retry, retried) -> dict[str, bytes]:
    """The kernel files and index.json of one target from its build results (see build_for_graph)."""
    files: dict[str, bytes] = {}
    kernels, failed = {}, {}
    for n in sorted(variants):
        configured, default = variants[n]
        used = default if n in retried else configured
        reason = _fit_reason(results[n], arch)
        if reason:
            failed[n] = {"kernel": configured.kernel, "config": configured.config.to_dict(),
                         "reason": f"{retry[n]}; with the default config: {reason}" if n in retried else reason}
            continue
        binary = results[n]
        metadata = {**binary.metadata, "triton_metadata": _portable(binary.metadata["triton_metadata"]),
                    "grid": json.loads(json.dumps(used.grid)), "static": dict(used.static), "variant": used.key,
                    **_generated_source(used)}
        binary = aot.KernelBinary(n, arch, binary.ptx, binary.cubin, metadata)
        entry = {"kernel": used.kernel, "variant": used.key, "config": used.config.to_dict(),
                 "files": [f"{n}.ptx", f"{n}.cubin", f"{n}.json"],
                 "resources": {k: metadata[k] for k in ("registers", "spill_stores", "spill_loads", "shared")},
                 "ptx_version": metadata.get("ptx_version"), "ptxas_version": metadata.get("ptxas_version")}
        if n in retry:
            entry["note"] = (f"configured {configured.config} {retry[n]} on {arch}; "
                             f"built with the default config {default.config} instead")
        kernels[n] = entry
        files.update(_saved_files(binary))
    nodes = []
    for e in served:
        wanted = e["variants"]
        nodes.append({**e, "variants": {key: n for key, n in wanted.items() if n in kernels},
                      "failed_variants": {key: n for key, n in wanted.items() if n in failed}})
    index = {"schema": INDEX_SCHEMA, "arch": arch, "target": target, "capability": aot.arch_limits(arch).capability,
             "triton_version": _triton_version(), "kernels": kernels, "failed": failed,
             "nodes": [e for e in nodes if e["variants"]],
             "not_served": not_served + [{k: e[k] for k in ("node", "op", "output")} |
                                         {"reason": "every variant failed to build (see 'failed')"}
                                         for e in nodes if not e["variants"]]}
    files[INDEX] = json.dumps(index, indent=1, sort_keys=True).encode()
    return files


def _saved_files(binary: aot.KernelBinary) -> dict[str, bytes]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        aot.save(binary, tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def _triton_version() -> str:
    import triton

    return triton.__version__


# ---- load -----------------------------------------------------------------------------------------------------

def read_index(data: bytes, where: str) -> dict:
    """The parsed index.json of an artifact's Triton kernels (ArtifactError when it is not one)."""
    try:
        index = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where} is not valid JSON ({exc}); export the artifact again") from None
    if not isinstance(index, dict) or index.get("schema") != INDEX_SCHEMA or not isinstance(index.get("kernels"), dict):
        raise ArtifactError(f"{where} is not a Triton kernel index of schema {INDEX_SCHEMA}; export the artifact again")
    return index


def read_record(data: bytes, where: str) -> dict:
    """The launch record (<name>.json) of one kernel, checked for the keys the launcher needs."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where} is not valid JSON ({exc}); export the artifact again") from None
    needed = ("module", "qualname", "arg_names", "signature", "constexprs", "divisible_by_16", "grid",
              "triton_metadata", "config", "static", "variant")
    meta = record.get("metadata") if isinstance(record, dict) else None
    missing = [k for k in needed if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ArtifactError(f"{where} lacks the launch metadata {missing}; export the artifact again")
    return record


class CubinBackend:
    """Runs the nodes an artifact's Triton index serves with the loaded cubins (see module docstring).

    `kernels`: kernel name -> an object with `launch(grid, values)` (cubin_runner.CubinKernel on a GPU;
    tests pass fakes); `records`: kernel name -> its launch record's "metadata". A call runs the launch spec's
    steps in order (launches and torch steps); a call with any launch whose variant was not built or whose
    values break its kernel's specialisation runs the torch reference instead, as a whole; `fallbacks`
    counts them per reason.
    """

    name = "triton-cubin"

    def __init__(self, index: Mapping[str, Any], records: Mapping[str, dict], kernels: Mapping[str, Any]):
        self.index = index
        self.records = records
        self.kernels = kernels
        self.by_output = {e["output"]: e for e in index.get("nodes", [])}
        self.fallbacks: dict[str, int] = {}

    def claim(self, node: Node, device: str) -> Kernel | None:
        entry = self.by_output.get(node.outputs[0].name if node.outputs else None)
        if entry is None or entry["op"] != node.op or not device.startswith("cuda"):
            return None
        from lmforge.backends.torch import TorchReference

        spec = ls.spec_for(node)
        names = entry["variants"]
        built = {key: ls.Built(KernelConfig.from_dict(self.records[n]["config"]), self.records[n]["static"])
                 for key, n in names.items()}
        reference = TorchReference().claim(node, device).fn

        def run(*inputs, **attrs):  # attrs: the node's attributes, as the generated code passes them
            call = spec.call(node, built, *inputs, **attrs)
            reason = "no kernel for this call" if call is None else self._unfit(call, names)
            if reason is not None:
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
                return reference(*inputs, **attrs)
            for step in call.steps:
                if isinstance(step, ls.Launch):
                    meta = self.records[names[step.variant]]
                    grid = ls.grid_of(meta["grid"], step.values, meta["constexprs"])
                    self.kernels[names[step.variant]].launch(grid, step.values)
                else:
                    step()                  # a torch step between launches (e.g. top-k selection)
            return call.result()

        return Kernel(run, self.name, ", ".join(sorted(names)))

    def _unfit(self, call: ls.Call, names: Mapping[str, str]) -> str | None:
        """Why `call` cannot run on the built kernels (a variant that was not built, or values outside a
        kernel's specialisation), else None. Every launch is checked before any step runs."""
        for launch in call.launches:
            if launch.variant not in names:
                return f"variant {launch.variant} was not built"
            meta = self.records[names[launch.variant]]
            reason = ls.check_values(meta["signature"], meta["divisible_by_16"], meta["constexprs"], launch.values)
            if reason is not None:
                return reason
        return None


class DriverTooOld(LmforgeError):
    """The CUDA driver is older than the CUDA version of the ptxas that assembled an artifact's cubins."""


def cuda_driver_version() -> int | None:
    """The CUDA version the installed driver supports (12080 for 12.8), or None where it cannot be read."""
    import torch

    getter = getattr(torch._C, "_cuda_getDriverVersion", None)   # CUDA builds of torch (2.11, 2.13)
    if getter is not None:
        try:
            return int(getter()) or None
        except (RuntimeError, TypeError, ValueError):
            pass
    try:                                                        # else ask the driver itself
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
            return version.value
    except (OSError, AttributeError):
        pass
    return None


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def check_driver(records: Mapping[str, dict], where: str, driver: int | None) -> None:
    """DriverTooOld when `driver` (e.g. 12080) is of an older CUDA major version than the ptxas that built any
    kernel of `records` (name -> launch metadata). A record without "ptxas_version" (exported before lmforge
    recorded it) or an unknown driver version is not checked: the load itself then says what fails."""
    built = {name: meta["ptxas_version"] for name, meta in records.items() if meta.get("ptxas_version")}
    if driver is None or not built:
        return
    name, newest = max(built.items(), key=lambda item: tuple(int(x) for x in item[1].split(".")))
    major = int(newest.split(".")[0])
    if driver // 1000 < major:
        reexport = (", or export the artifact again with this lmforge (its exports for sm_80 - sm_90 are assembled "
                    "by a CUDA 12 ptxas)") if driver // 1000 == 12 else ""
        raise DriverTooOld(
            f"the cubins in {where} were assembled by the ptxas of CUDA {newest} (e.g. {name}), but this machine's "
            f"CUDA driver supports CUDA {_cuda_text(driver)} only, and a driver cannot load cubins of a newer CUDA "
            f"major version. Update the NVIDIA driver to one for CUDA {major}.x or newer{reexport}")


def load_kernels(index: Mapping[str, Any], files: Mapping[str, bytes], where: str, graph: Graph | None = None
                 ) -> CubinBackend:
    """Load every kernel of `index` (files: name -> bytes, already hash-checked) on the current GPU.

    graph: the artifact's graph, against which a kernel generated from a fused region is checked
    (`check_generated_sources`) before its source is imported.
    DriverTooOld (before any cubin is loaded) when the CUDA driver is too old for the cubins (check_driver)."""
    from lmforge.backends.triton.cubin_runner import CubinKernel

    records = {}
    for name in sorted(index["kernels"]):
        try:
            records[name] = read_record(files[f"{name}.json"], f"{where}/{name}.json")["metadata"]
        except KeyError as exc:
            raise ArtifactError(f"{where} index lists kernel {name!r} but its file {exc} is not in the artifact; "
                                "export the artifact again") from None
    check_generated_sources(records, index, graph, where)
    check_driver(records, where, cuda_driver_version())
    kernels = {}
    for name, meta in records.items():
        try:
            kernels[name] = CubinKernel(name, meta, files[f"{name}.ptx"].decode(), files[f"{name}.cubin"])
        except KeyError as exc:
            raise ArtifactError(f"{where} index lists kernel {name!r} but its file {exc} is not in the artifact; "
                                "export the artifact again") from None
    return CubinBackend(index, records, kernels)


def check_generated_sources(records: Mapping[str, dict], index: Mapping[str, Any], graph: Graph | None,
                            where: str) -> None:
    """An ArtifactError unless the source every generated kernel's record carries (a fused elementwise region's
    kernel, imported at load to give the launcher its argument layout) is exactly what this lmforge generates
    from the graph's own region, for every node the index says the kernel serves: an artifact holds data, and
    no Python code of its own is ever run (a record with other source, or a graph.json whose region was changed
    to match it, is refused)."""
    from lmforge.backends.triton import elementwise

    served: dict[str, list[int]] = {}
    for entry in index.get("nodes", ()):
        for name in (entry.get("variants") or {}).values():
            served.setdefault(name, []).append(entry.get("node"))
    for name, meta in records.items():
        source = meta.get("source")
        if source is None:
            continue
        rank = 1 + sum(bool(re.fullmatch(r"size\d+", a)) for a in meta.get("arg_names", ()))
        nodes = served.get(name) or []

        def generated(i) -> str | None:
            if graph is None or not isinstance(i, int) or not 0 <= i < len(graph.nodes):
                return None
            node = graph.nodes[i]
            if node.op != "fused" or not node.regions or elementwise.unsupported(node):
                return None
            return elementwise.kernel_source(node.regions[0], rank)

        named = meta.get("module") == elementwise.module_name(source) and meta.get("qualname") == elementwise.KERNEL
        if not named or not nodes or any(generated(i) != source for i in nodes):
            raise ArtifactError(f"{where}/{name}.json carries a generated kernel source that is not what this lmforge "
                                "generates from the graph's fused region it serves (lmforge never runs code an "
                                "artifact brings); export the artifact again with this lmforge")


def local_arch(device=None) -> str | None:
    """"sm_XY" of `device` (default: the current CUDA device), or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def warn_or_raise(message: str, required: bool) -> None:
    if required:
        raise LmforgeError(message)
    warnings.warn(message, stacklevel=3)
