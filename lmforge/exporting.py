"""Exporting a compiled model as an artifact directory: `export(compiled, path)`.

    out/tiny-llama/
      manifest.json          schema version, versions, targets + fingerprints, config, objectives, sha256 of
                             every other file (see lmforge.artifact.MANIFEST_SCHEMA)
      graph.json             the compiled graph (structure only)
      weights.safetensors    every parameter, contiguous CPU tensors (packed quantized weights included)
      model.onnx             when the graph maps to ONNX (else the manifest's "onnx" says why not)
      kernels/<target>/...   files the backends produced (compiled.kernel_files)
      README.md              what the artifact is and how to load it

The directory is written under a temporary name beside `path` and renamed into place at the end, so a
crash leaves no half-written artifact. An existing artifact at `path` is replaced; any other existing
non-empty directory is refused. `lmforge.artifact.load` reads it back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from lmforge.artifact import FORMAT, GRAPH_FILE, HOST, MANIFEST, SCHEMA_VERSION, WEIGHTS_FILE, safe_relative_path
from lmforge.errors import ArtifactError, LmforgeError, TargetError

ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"
ONNX_EXTERNAL_BYTES = 1 << 30  # above this the ONNX initializers go to model.onnx.data (protobuf caps at 2 GiB)
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# module -> distribution, for the versions recorded in the manifest
_VERSIONED = {"lmforge": "lmforge", "torch": "torch", "triton": "triton", "tvm": "apache-tvm", "onnx": "onnx"}


def library_versions() -> dict[str, str | None]:
    """Version of each library in `_VERSIONED`, or None when it is not importable.

    A module already imported gives its `__version__`; otherwise the installed distribution's version is
    read from its metadata after checking the module can be found, without importing it (importing TVM
    takes seconds).
    """
    import importlib.metadata
    import importlib.util
    import sys

    out: dict[str, str | None] = {}
    for module, dist in _VERSIONED.items():
        version = getattr(sys.modules.get(module), "__version__", None)
        if version is None:
            try:
                if importlib.util.find_spec(module) is not None:
                    version = importlib.metadata.version(dist)
            except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
                version = None
        if version is None and module == "lmforge":
            import lmforge

            version = getattr(lmforge, "__version__", None)
        out[module] = None if version is None else str(version)
    return out


def target_entry(name: str, strict: bool = True) -> dict[str, Any]:
    """{"name", "kind", "fingerprint"} of a target. The host entry is the portable torch reference (no
    fingerprint: it runs on any CPU; `export` gives it one when the artifact carries a host TVM library).
    Unknown names raise TargetError when `strict`, else get kind "unknown"."""
    if name == HOST:
        return {"name": HOST, "kind": "cpu", "fingerprint": None}
    try:
        from lmforge.hwmodels.presets import get_target
    except ImportError:  # hardware models unavailable: record the name alone
        return {"name": name, "kind": "unknown", "fingerprint": None}
    try:
        hw = get_target(name)
    except TargetError:
        if strict:
            raise
        return {"name": name, "kind": "unknown", "fingerprint": None}
    return {"name": name, "kind": hw.kind, "fingerprint": hw.fingerprint()}


def _json_safe(value: Any) -> Any:
    """`value` as plain JSON (tuples become lists, anything else unknown its repr)."""
    return json.loads(json.dumps(value, default=repr))


def _kernel_files(compiled) -> dict[str, bytes]:
    """compiled.kernel_files ({target: {relative path: bytes}}) as artifact paths, checked for escapes."""
    out = {}
    for target, files in (getattr(compiled, "kernel_files", None) or {}).items():
        if not isinstance(target, str) or not _TARGET_NAME.fullmatch(target):
            raise ArtifactError(f"kernel_files target name {target!r} is not a plain name (letters, digits, . _ -)")
        for rel, data in files.items():
            safe_relative_path(rel, where=f"kernel_files[{target!r}]")
            if not isinstance(data, (bytes, bytearray)):
                raise ArtifactError(f"kernel file {target}/{rel} must be bytes, not {type(data).__name__}")
            out[f"kernels/{target}/{rel}"] = bytes(data)
    return out


def _host_kernel_files(compiled) -> tuple[dict[str, bytes], str | None]:
    """The TVM backend's host kernels as kernels/host/tvm/ (shared libraries and their index) and the host
    target's fingerprint; nothing when no node of `compiled` runs a TVM host kernel (TVM is imported only then)."""
    if not any(getattr(k, "backend", None) == "tvm" for k in getattr(compiled, "kernels", None) or ()):
        return {}, None
    from lmforge.backends.tvm.host_library import host_kernel_files

    files, fingerprint = host_kernel_files(compiled)
    return {f"kernels/{HOST}/{rel}": data for rel, data in files.items()}, fingerprint


def _weights_bytes(graph) -> bytes:
    """graph.weights as safetensors: contiguous CPU tensors, copies where two share storage."""
    import torch
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name in sorted(graph.weights):
        w = graph.weights[name]
        if not isinstance(w, torch.Tensor):
            raise ArtifactError(f"weight {name!r} is a {type(w).__name__}, not a tensor; export needs tensors")
        w = w.detach().to("cpu").contiguous()
        ptr = w.untyped_storage().data_ptr()
        if ptr in seen and w.numel():
            w = w.clone()
        seen.add(ptr)
        tensors[name] = w
    return save(tensors, metadata={"format": "pt", "producer": "lmforge"})


def _onnx_files(graph) -> tuple[dict[str, bytes], dict[str, Any]]:
    """({file: bytes}, manifest "onnx" entry). A graph with no ONNX form gets a reason instead of a file, and so
    does a machine without the onnx package (or with one that fails to import)."""
    try:
        from lmforge.backends.onnx_export import OPSET, to_onnx
    except Exception as e:   # not installed (ImportError), or a broken install (e.g. a protobuf mismatch: TypeError)
        warnings.warn(f"onnx cannot be imported ({type(e).__name__}: {e}); the artifact is written without "
                      "model.onnx")
        return {}, {"written": False, "reason": f"onnx cannot be imported here: {type(e).__name__}: {e}"}

    if graph.get_meta("tensor_parallel"):
        return {}, {"written": False, "reason": "a tensor-parallel graph (one rank's program with whole weights "
                                                "and collectives) has no ONNX form here"}
    try:
        model = to_onnx(graph)
    except LmforgeError as e:
        return {}, {"written": False, "reason": str(e)}
    except Exception as e:  # a bug in the ONNX exporter must not cost the user the artifact
        warnings.warn(f"ONNX export failed ({type(e).__name__}: {e}); the artifact is written without model.onnx")
        return {}, {"written": False, "reason": f"ONNX export failed: {type(e).__name__}: {e}"}
    # lmforge ops with no standard ONNX form are in the ai.lmforge domain: onnxruntime cannot run such a file
    custom = sorted({n.op_type for n in model.graph.node if n.domain == "ai.lmforge"})
    if model.ByteSize() < ONNX_EXTERNAL_BYTES:
        return {ONNX_FILE: model.SerializeToString()}, {"written": True, "opset": OPSET, "external_data": False,
                                                        "custom_ops": custom}
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save_model(model, f"{tmp}/{ONNX_FILE}", save_as_external_data=True, all_tensors_to_one_file=True,
                        location=ONNX_DATA_FILE, size_threshold=1024)
        files = {name: Path(tmp, name).read_bytes() for name in (ONNX_FILE, ONNX_DATA_FILE)}
    return files, {"written": True, "opset": OPSET, "external_data": True, "custom_ops": custom}


def _readme(manifest: dict) -> bytes:
    def io_lines(key):
        return "\n".join(f"| `{v['name']}` | {v['type']['dtype']}[{', '.join(map(str, v['type']['shape']))}] |"
                         for v in manifest[key])

    custom = manifest["onnx"].get("custom_ops")
    runs = f"; lmforge ops {custom} in the `ai.lmforge` domain: onnxruntime cannot run it" if custom else \
        "; standard ops only (runs in onnxruntime)"
    onnx_line = (f"`model.onnx` (ONNX opset {manifest['onnx'].get('opset')}{runs})" if manifest["onnx"]["written"]
                 else f"no `model.onnx`: {manifest['onnx']['reason']}")
    targets = ", ".join(f"{t['name']} ({t['kind']}, fingerprint {t['fingerprint']})" for t in manifest["targets"])
    files = "\n".join(f"| `{rel}` | {e['bytes']} |" for rel, e in sorted(manifest["files"].items()))
    objectives = _objectives_line(manifest.get("objectives") or {})
    origin = manifest.get("config_source")
    source = f" (the best of tuning study `{origin.get('study')}`, trial {origin.get('trial')})" if origin else ""
    text = f"""# {manifest['name']}

An lmforge artifact, exported {manifest['created']} (lmforge {manifest['versions']['lmforge']},
torch {manifest['versions']['torch']}).

    import lmforge
    model = lmforge.load("path/to/this/directory")                  # every file's hash checked first
    on_gpu = lmforge.load("path/to/this/directory", device="cuda")  # the cubins of this GPU's arch, if held

{_kernels_line(manifest["files"])}

## Inputs

| name | type |
|---|---|
{io_lines('inputs')}

## Outputs

| name | type |
|---|---|
{io_lines('outputs')}

## Targets and configuration

Compiled for `{manifest['target']}`; targets: {targets}.
Graph signature `{manifest['graph_hash']}`. {onnx_line}.

Configuration: `{json.dumps(manifest['config'], sort_keys=True)}`{source}

{objectives}

## Files

| file | bytes |
|---|---|
{files}
| `README.md` | this file |
| `manifest.json` | sha256 and size of every file above |
"""
    return text.encode()


def _kernels_line(files: Mapping[str, Any]) -> str:
    """What runs the graph where: the kernels the artifact holds per target, in a sentence."""
    held: dict[str, list[str]] = {}
    for rel in files:
        parts = rel.split("/")
        if parts[0] == "kernels" and len(parts) > 3:
            held.setdefault(parts[1], []).append("/".join(parts[2:]))
    what = []
    for target, names in sorted(held.items()):
        counts = {"Triton cubins": sum(n.startswith("triton/") and n.endswith(".cubin") for n in names),
                  "TVM CUDA sources": sum(n.startswith("tvm-cuda/") and n.endswith(".cu") for n in names),
                  "TVM host libraries": sum(n.startswith("tvm/") and n.endswith(".so") for n in names)}
        what.append(f"{target}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n))
    if not what:
        return "Kernels: none; `load` runs every node with the torch reference (on the CPU or a GPU)."
    return ("Kernels (`kernels/<target>/`): " + "; ".join(what) + ". `load` runs the ones that fit the machine (host "
            "libraries on a CPU of the same kind, cubins on a GPU of their arch) and the torch reference for the rest.")


def _objectives_line(objectives: Mapping[str, Any]) -> str:
    """The manifest's objectives in a sentence: what was predicted, what measured (and that latency was not)."""
    if not objectives:
        return "Objectives: none recorded (the config did not come from a tuning study, or none were given)."

    def numbers(d):
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(d.items()))

    predicted, measured = objectives.get("predicted") or {}, objectives.get("measured") or {}
    where = objectives.get("target")
    sizes = objectives.get("bindings")
    text = f"Objectives (tuning mode `{objectives.get('mode', '?')}`): predicted"
    text += f" on {where}" if where else ""
    text += f" at {sizes}" if sizes else ""
    text += f": {numbers(predicted) or 'none'}; measured: {numbers(measured) or 'none'}"
    if predicted and "latency" not in measured:
        text += " (latency was predicted, not measured)"
    return text + ". Units: seconds, bytes, tokens/s."


def _destination(path: Path) -> bool:
    """Whether `path` holds an artifact (or an empty dir) to replace; ArtifactError for anything else there."""
    if not path.exists() and not path.is_symlink():
        return False
    if path.is_symlink() or not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory; choose another export path")
    if not any(path.iterdir()):
        return True
    try:
        is_artifact = json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_artifact = False
    if not is_artifact:
        raise ArtifactError(f"{path} is a non-empty directory that is not an lmforge artifact; refusing to "
                            "overwrite it. Choose another path or empty it first")
    return True


def _write_atomically(path: Path, files: Mapping[str, bytes], manifest: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    replace = _destination(path)
    try:
        tmp.mkdir(parents=True)
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if replace:
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)  # put the previous artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(compiled, path, *, objectives: Mapping[str, Any] | None = None,
           targets: Sequence[str] | None = None) -> Path:
    """Write `compiled` (a CompiledModel) as an artifact directory at `path`; return the path.

    objectives: {"predicted": {...}, "measured": {...}} from tuning, recorded as they are; default: the model's
                own (`compiled.objectives`: a config="best" compile takes its trial's, see
                lmforge.search.studies.trial_objectives; a loaded artifact keeps its manifest's).
    targets:    more target names the configuration is meant for (besides compiled.target, the targets of
                compiled.kernel_files, and "host", which is always listed).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise LmforgeError(f"export needs a directory path, got {path!r}")
    path = Path(path)
    inside = next((p for p in path.resolve().parents if (p / MANIFEST).is_file()), None)
    if inside is not None:
        raise LmforgeError(f"{path} is inside the artifact {inside}: exporting there would break it (its manifest "
                           "lists every file it holds); export to a directory outside it")
    graph = compiled.graph
    files: dict[str, bytes] = {GRAPH_FILE: graph.to_json().encode(), WEIGHTS_FILE: _weights_bytes(graph)}
    kernels = _kernel_files(compiled)
    built = getattr(compiled, "kernel_files", None) or {}
    dropped = [t for t in getattr(compiled, "artifact_kernel_targets", ()) if t not in built]
    if dropped:
        warnings.warn(f"this model was loaded from an artifact with GPU kernels for {dropped}; they are not carried "
                      f"over: call add_gpu_kernels({dropped}) before export to build them again", stacklevel=2)
    files.update(kernels)
    host_files, host_fingerprint = _host_kernel_files(compiled)
    if getattr(compiled, "artifact_host_library", False) and not host_files:
        warnings.warn("this model was loaded from an artifact with a TVM host library, but it ran no node with it "
                      "(loaded with kernels='none', or the library did not fit this machine), so the export has "
                      "none: load it where the library runs (or compile with backends=('tvm',)) and export again",
                      stacklevel=2)
    files.update(host_files)
    onnx_files, onnx_entry = _onnx_files(graph)
    files.update(onnx_files)
    names = [HOST, compiled.target, *(targets or ())]
    entries = {n: target_entry(n) for n in dict.fromkeys(names)}
    for name in getattr(compiled, "kernel_files", None) or {}:
        entries.setdefault(name, target_entry(name, strict=False))
    if host_fingerprint:   # the host entry names the machine kind its TVM library runs on
        entries[HOST]["fingerprint"] = host_fingerprint
    manifest = {
        "schema_version": SCHEMA_VERSION, "format": FORMAT, "name": graph.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(), "graph_hash": graph.signature(), "target": compiled.target,
        "targets": list(entries.values()), "config": _json_safe(dict(compiled.config or {})),
        "objectives": _json_safe(dict(objectives if objectives is not None else
                                      getattr(compiled, "objectives", None) or {})),
        "inputs": [{"name": v.name, "type": v.type.to_json()} for v in graph.inputs],
        "outputs": [{"name": v.name, "type": v.type.to_json()} for v in graph.outputs],
        "onnx": onnx_entry, "pass_report": str(getattr(compiled, "pass_report", "") or ""), "files": {},
    }
    libraries = _op_libraries(graph)
    if libraries:   # ops of other libraries (a Hugging Face MoE's grouped matmul): load names the import they need
        manifest["op_libraries"] = libraries
    if getattr(compiled, "config_source", None):  # config="best": the tuning study and trial it came from
        manifest["config_source"] = _json_safe(dict(compiled.config_source))
    manifest["files"] = _file_entries(files)
    files["README.md"] = _readme(manifest)
    manifest["files"] = _file_entries(files)
    _write_atomically(path, files, manifest)
    return path


def _op_libraries(graph) -> dict[str, str]:
    """{fallback op: the module that registers it} for the graph's fallbacks of ops that are not torch's own."""
    from lmforge.ir.ops.tensor_ops import op_library

    targets = {n.attr["target"] for n in graph.walk_nodes() if n.op == "torch_fallback"}
    return {t: lib for t in sorted(targets) if (lib := op_library(t))}


def _file_entries(files: Mapping[str, bytes]) -> dict[str, dict]:
    return {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for rel, data in sorted(files.items())}


def export_workload(workload_spec: str, target: str, out_dir, *, config=None, gpu_kernels: bool = False,
                    storage: str | None = None, study: str | None = None,
                    kernel_targets: Sequence[str] = ()) -> Path:
    """Load a workload (`file.py[:function]` or `module:function`), compile it for `target`, export to `out_dir`.

    config: knob values, "best" (the tuning database's best for this target: of `study`, else of the most recently
            run study; see `lmforge.compile`), or None (defaults).
    gpu_kernels: also write the target's kernels: for a GPU target its Triton cubins and TVM CUDA source
            (`add_gpu_kernels`); for "host", the model runs with the TVM backend and the artifact carries its host
            shared library (kernels/host/tvm/, see lmforge.backends.tvm.host_library).
    kernel_targets: more GPU targets to build kernels for (the artifact holds every one; `load(device="cuda")`
            picks the one matching the GPU).
    """
    import lmforge
    from lmforge.workload import load_workload

    work = load_workload(workload_spec)
    best = config == "best"
    host_kernels = gpu_kernels and target == HOST
    compiled = lmforge.compile(work.model, work.example_inputs, dynamic=work.dynamic, target=target, config=config,
                               storage=storage if best else None, study=study if best else None,
                               backends=("tvm",) if host_kernels else ("torch",))
    if host_kernels:   # the TVM backend's host library: built for the example inputs' shapes (and main builds)
        compiled(*work.example_inputs)
    gpu_targets = [*([target] if (gpu_kernels or kernel_targets) and target != HOST else []), *kernel_targets]
    if gpu_targets:
        compiled.add_gpu_kernels(list(dict.fromkeys(gpu_targets)))
    return export(compiled, out_dir)
