"""Loading exported artifacts: `load(path, device="cpu")` -> CompiledModel, after validating everything.

An artifact directory (written by `lmforge.exporting.export`) holds `manifest.json`, `graph.json`,
`weights.safetensors`, optionally `model.onnx` and `kernels/<target>/...`, and `README.md`. Loading:

1. reads `manifest.json` (JSON only; a repeated key is an error) and checks it against `MANIFEST_SCHEMA`
   (keys, types, `schema_version`, `format`);
2. checks every path the manifest lists: relative, no `..`, no symlink, a regular file inside the
   artifact directory; then its size and sha256. **Extra files are refused**: an artifact is a sealed
   unit, and a file nobody listed is either a mistake or tampering (re-export, or delete the file);
3. checks the requested device/target against the targets the artifact was built for;
4. parses graph.json and weights.safetensors from the very bytes that were hashed (never a second read),
   never unpickling anything (`torch.load` is not used), and checks the weights against the graph's params;
5. builds a CompiledModel run by the torch reference backend; on a CUDA device, when a GPU target's Triton
   kernels (kernels/<target>/triton/, see lmforge.backends.triton.artifact_kernels) were built for this
   GPU's arch, their cubins run the nodes they serve; on the CPU, when the artifact carries the TVM backend's
   host library (kernels/host/tvm/, see lmforge.backends.tvm.host_library) and it fits this machine, its
   kernels run the nodes they serve (`kernels="auto" | "required" | "none"`, see `load`). Loading a shared
   library runs its code: it is loaded only from the bytes whose sha256 was checked in step 2.

Every failure is an ArtifactError or TargetError raised here, saying what is wrong and what to do, with
the library exception that detected it suppressed (`from None`). The sha256 sums detect corruption and
edits of single files; they do not authenticate the artifact (whoever can rewrite files can rewrite the
manifest too): load artifacts from sources you trust.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from lmforge.errors import ArtifactError, LmforgeError, TargetError

SCHEMA_VERSION = 1
FORMAT = "lmforge-artifact"
MANIFEST = "manifest.json"
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"
HOST = "host"
HOST_TVM_DIR = f"kernels/{HOST}/tvm"            # the TVM backend's host library (lmforge.backends.tvm.host_library)
HOST_TVM_INDEX = f"{HOST_TVM_DIR}/index.json"

# key -> (type or types, required). Nested entries are checked by _check_entries.
MANIFEST_SCHEMA: dict[str, tuple[Any, bool]] = {
    "schema_version": (int, True), "format": (str, True), "name": (str, True), "created": (str, True),
    "versions": (dict, True), "graph_hash": (str, True), "target": (str, True), "targets": (list, True),
    "config": (dict, True), "objectives": (dict, True), "inputs": (list, True), "outputs": (list, True),
    "files": (dict, True), "onnx": (dict, True), "pass_report": (str, False),
    "op_libraries": (dict, False),   # {fallback op: the module that registers it} for ops not torch's own
    "config_source": (dict, False),  # config="best": {"study", "trial"} of the tuning study the config is from
}
_TARGET_SCHEMA = {"name": (str, True), "fingerprint": ((str, type(None)), True), "kind": (str, True)}
_IO_SCHEMA = {"name": (str, True), "type": (dict, True)}
_FILE_SCHEMA = {"sha256": (str, True), "bytes": (int, True)}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _fail(message: str) -> ArtifactError:
    return ArtifactError(message)


# ---- manifest ----------------------------------------------------------------------------------------

def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def read_manifest(root: Path) -> dict:
    """The manifest of artifact `root`, checked against MANIFEST_SCHEMA (ArtifactError otherwise)."""
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        what = "is a symlink" if path.is_symlink() else "is missing"
        raise _fail(f"{path} {what}: {root} is not an lmforge artifact (or an incomplete one). Export it "
                    "again with `compiled.export(path)` or `lmforge export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(f"{path} is not valid JSON ({type(e).__name__}: {e}); the artifact is corrupt: export it "
                    "again") from None
    validate_manifest(manifest, str(path))
    return manifest


def validate_manifest(manifest: Any, where: str = MANIFEST) -> None:
    """Hand-written schema check: required keys, their types, schema version, file and target entries."""
    if not isinstance(manifest, dict):
        raise _fail(f"{where} must hold a JSON object, not {type(manifest).__name__}; export the artifact again")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _fail(f"{where} has schema_version {version!r}; this lmforge reads version {SCHEMA_VERSION}. "
                    "Load it with the lmforge version that wrote it (see manifest 'versions'), or re-export it")
    if manifest.get("format") != FORMAT:
        raise _fail(f"{where}: format is {manifest.get('format')!r}, not {FORMAT!r}: not an lmforge artifact. "
                    "Load a directory written by `compiled.export(path)`, or export the artifact again")
    _check_entries(manifest, MANIFEST_SCHEMA, where)
    for i, t in enumerate(manifest["targets"]):
        _check_entries(t, _TARGET_SCHEMA, f"{where} targets[{i}]")
    for key in ("inputs", "outputs"):
        for i, v in enumerate(manifest[key]):
            _check_entries(v, _IO_SCHEMA, f"{where} {key}[{i}]")
    for rel, entry in manifest["files"].items():
        _check_entries(entry, _FILE_SCHEMA, f"{where} files[{rel!r}]")
        if not _SHA256.fullmatch(entry["sha256"]) or entry["bytes"] < 0:
            raise _fail(f"{where} files[{rel!r}] needs a lowercase hex sha256 and a size >= 0; "
                        "the manifest was edited by hand or is corrupt: export the artifact again")
    for required in (GRAPH_FILE, WEIGHTS_FILE):
        if required not in manifest["files"]:
            raise _fail(f"{where} does not list {required}; every artifact has one: export it again")
    if manifest["target"] not in {t["name"] for t in manifest["targets"]}:
        raise _fail(f"{where}: target {manifest['target']!r} is not among its targets; export the artifact again")
    if HOST not in {t["name"] for t in manifest["targets"]}:
        raise _fail(f"{where} targets do not include {HOST!r} (the torch reference every artifact carries); "
                    "export the artifact again")


def _check_entries(obj: Any, schema: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise _fail(f"{where} must be a JSON object, not {type(obj).__name__}; export the artifact again")
    for key, (types, required) in schema.items():
        if key not in obj:
            if required:
                raise _fail(f"{where} is missing key {key!r}; the manifest is incomplete: export the artifact again")
            continue
        value = obj[key]
        if isinstance(value, bool) and types is int or not isinstance(value, types):
            want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise _fail(f"{where} key {key!r} must be {want}, got {type(value).__name__} ({value!r:.60}); "
                        "the manifest is corrupt or hand-edited: export the artifact again")


# ---- files -------------------------------------------------------------------------------------------

def safe_relative_path(rel: Any, where: str = MANIFEST) -> PurePosixPath:
    """`rel` as a path inside the artifact, or ArtifactError: absolute paths, `..`, `\\` and empty parts."""
    if not isinstance(rel, str) or not rel:
        raise _fail(f"{where} lists a file with an empty or non-string name {rel!r}; export the artifact again")
    p = PurePosixPath(rel)
    if "\x00" in rel or any(ord(c) < 32 for c in rel):
        raise _fail(f"{where} lists a file name with control characters {rel!r}; the manifest was tampered with: "
                    "do not load it, export the artifact again")
    if p.is_absolute() or re.match(r"^[A-Za-z]:", rel) or "\\" in rel:
        raise _fail(f"{where} lists an absolute path {rel!r}; artifact files must be relative to the artifact "
                    "directory. The manifest was tampered with: do not load it, export the artifact again")
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise _fail(f"{where} lists {rel!r}, which leaves the artifact directory (or is not normalized); "
                    "the manifest was tampered with: do not load it, export the artifact again")
    if rel == MANIFEST:
        raise _fail(f"{where} lists itself under 'files'; export the artifact again")
    return p


def _inside(root: Path, rel: str) -> Path:
    """The absolute path of `rel` after checking that no component is a symlink and it stays in root."""
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            target = os.readlink(path)
            escapes = not (root.resolve() / rel).resolve().is_relative_to(root.resolve())
            how = "points outside the artifact directory" if escapes else "is a symlink"
            raise _fail(f"{rel!r} in {root} {how} (-> {target}); artifact files must be regular files: "
                        "do not load it, export the artifact again")
    if not path.resolve().is_relative_to(root.resolve()):
        raise _fail(f"{rel!r} resolves outside {root}; do not load this artifact, export it again")
    return path


def _walk_files(root: Path) -> set[str]:
    """Every entry under root (relative, '/'-separated) except the manifest; refuses symlinks."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                _inside(root, rel)  # raises, naming where the link points
            if name in filenames:
                found.add(rel)
    found.discard(MANIFEST)
    return found


def _read_checked(root: Path, rel: str, entry: dict, keep: bool) -> bytes | None:
    """Check size then sha256 of one listed file; return its bytes when `keep` (parsed from these bytes)."""
    path = _inside(root, rel)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _fail(f"{rel} is listed in the manifest but missing from {root}; the artifact is incomplete: "
                    "copy it again or export it again") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(f"manifest entry {rel!r} is a directory or special file in {root}, not a regular file; "
                    "the manifest is corrupt: export the artifact again")
    if st.st_size != entry["bytes"]:
        raise _fail(f"{rel} has {st.st_size} bytes but the manifest says {entry['bytes']}: the file is truncated "
                    "or was modified. Copy the artifact again or export it again")
    digest, chunks = hashlib.sha256(), []
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise _fail(f"{rel} does not match its sha256 in the manifest: the file is corrupt or was modified. "
                    "Copy the artifact again or export it again")
    return b"".join(chunks) if keep else None


def check_files(root: Path, manifest: dict, keep: tuple[str, ...] = (GRAPH_FILE, WEIGHTS_FILE)) -> dict[str, bytes]:
    """Validate every listed file (paths, sizes, hashes) and refuse unlisted ones; return the `keep` files' bytes."""
    listed = manifest["files"]
    for rel in listed:
        safe_relative_path(rel)
    extra = sorted(_walk_files(root) - set(listed))
    if extra:
        raise _fail(f"{root} holds files its manifest does not list: {extra[:5]}{' ...' if len(extra) > 5 else ''}. "
                    "An artifact is sealed: remove them (or export the artifact again) before loading")
    return {rel: data for rel in sorted(listed) if (data := _read_checked(root, rel, listed[rel], rel in keep))
            is not None}


# ---- targets -----------------------------------------------------------------------------------------

def check_target(manifest: dict, device: str, target: str | None = None) -> None:
    """TargetError unless the artifact was built for the requested target and device kind."""
    import torch

    names = [t["name"] for t in manifest["targets"]]
    listing = ", ".join(f"{t['name']} ({t['kind']})" for t in manifest["targets"])
    if target is not None and target.lower() not in {n.lower() for n in names}:
        raise TargetError(f"artifact {manifest['name']!r} was not built for target {target!r}; it has: {listing}. "
                          f"Load it with target=None (or one of those), or compile and export the model again "
                          f"with lmforge.compile(..., target={target!r})")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise TargetError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if kind == "cpu":
        return
    if kind != "cuda":
        raise TargetError(f"device {device!r} is not supported by lmforge artifacts; use 'cpu' or 'cuda'")
    gpus = [t["name"] for t in manifest["targets"] if t["kind"] == "gpu"]
    if not gpus:
        raise TargetError(f"artifact {manifest['name']!r} has no GPU target (it has: {listing}), so it cannot "
                          f"load on device {device!r}. Load it with device='cpu', or compile the model for a GPU "
                          "(lmforge.compile(..., target='h100')) and export it again")
    if not torch.cuda.is_available():
        raise TargetError(f"artifact {manifest['name']!r} targets {gpus} but this machine has no CUDA device; "
                          "load it with device='cpu' here, or on a machine with the GPU")


# ---- graph and weights -------------------------------------------------------------------------------

def _check_ops_present(graph, manifest: dict) -> None:
    """An LmforgeError at load, not at the first call, when a fallback's op is not in this process (a library's
    custom op whose module was not imported), naming the module the manifest says registers it."""
    from lmforge.ir.ops.tensor_ops import aten_op, missing_op_error

    libraries = manifest.get("op_libraries") or {}
    for n in graph.walk_nodes():
        if n.op == "torch_fallback" and aten_op(n.attr["target"]) is None:
            library = libraries.get(n.attr["target"])
            raise missing_op_error(n.attr["target"], library if isinstance(library, str) else None)


def _parse_graph(data: bytes, manifest: dict):
    from lmforge.ir.graph import Graph, dict_signature
    from lmforge.ir.verify import verify

    try:
        graph = Graph.from_json(data.decode("utf-8"))
        verify(graph)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError, LmforgeError) as e:
        raise _fail(f"{GRAPH_FILE} is not a valid lmforge graph ({type(e).__name__}: {e}); "
                    "export the artifact again with this lmforge version") from None
    # The manifest holds the signature of the graph as written (an earlier lmforge's graph lacks attributes added
    # since, which loading sets to their defaults); artifacts exported before `Graph.signature` left out node
    # sources and capture meta hold the hash of the whole graph JSON. Each names this graph.
    written = json.loads(data.decode("utf-8"))
    legacy = hashlib.sha256(json.dumps(written, indent=1, sort_keys=True).encode()).hexdigest()[:16]
    if manifest["graph_hash"] not in (graph.signature(), dict_signature(written), legacy):
        raise _fail(f"{GRAPH_FILE} has signature {graph.signature()} but the manifest says "
                    f"{manifest['graph_hash']}: the graph was modified. Export the artifact again")
    for key, values in (("inputs", graph.inputs), ("outputs", graph.outputs)):   # what inspect / README report
        listed = [(e.get("name"), e.get("type")) if isinstance(e, dict) else e for e in manifest[key]]
        if listed != [(v.name, v.type.to_json()) for v in values]:
            raise _fail(f"{MANIFEST} lists {key} {listed} but {GRAPH_FILE} has "
                        f"{[(v.name, str(v.type)) for v in values]}: the manifest was modified. Export the "
                        "artifact again")
    return graph


def _parse_weights(data: bytes, graph) -> dict:
    from safetensors.torch import load as load_safetensors

    from lmforge.ir.types import dtype_name

    try:
        weights = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types (and OverflowError, ...) on bad bytes
        raise _fail(f"{WEIGHTS_FILE} is not a readable safetensors file ({type(e).__name__}: {e}); "
                    "export the artifact again") from None
    from lmforge.ir.graph import all_regions, region_params
    from lmforge.passes.shard import whole_param_types

    params = {p.name: p.type for p in (*graph.params, *region_params(graph))}  # a program's models' weights too
    for g in (graph, *all_regions(graph)):
        params.update(whole_param_types(g))   # a tensor-parallel graph (or region) keeps its split weights whole
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise _fail(f"{WEIGHTS_FILE} does not match the graph's parameters (missing {missing[:5]}, unexpected "
                    f"{extra[:5]}); export the artifact again")
    for name, t in params.items():
        w = weights[name]
        shape_ok = len(w.shape) == t.rank and all(isinstance(d, str) or d == s for d, s in zip(t.shape, w.shape))
        if not shape_ok or dtype_name(w.dtype) != t.dtype:
            raise _fail(f"weight {name!r} is {dtype_name(w.dtype)}{list(w.shape)} but the graph expects {t}; "
                        "export the artifact again")
    return weights


# ---- public API --------------------------------------------------------------------------------------

def artifact_dir(path) -> Path:
    root = Path(path)
    if not root.exists():
        raise _fail(f"artifact {str(root)!r} does not exist; export one with `compiled.export(path)`")
    if root.is_symlink():
        raise _fail(f"artifact {str(root)!r} is a symbolic link (to {str(root.resolve())!r}); symlinks are refused, "
                    "so a link cannot redirect a load to other files: give the artifact directory's real path")
    if not root.is_dir():
        raise _fail(f"artifact {str(root)!r} is not a directory; an lmforge artifact is a directory with a "
                    "manifest.json")
    return root


def inspect_artifact(path) -> dict:
    """Validate an artifact fully (manifest, paths, sizes, hashes) without building a model; return its manifest."""
    root = artifact_dir(path)
    manifest = read_manifest(root)
    check_files(root, manifest, keep=())
    return manifest


KERNEL_MODES = ("auto", "required", "none")


def load(path, device: str = "cpu", *, target: str | None = None, kernels: str = "auto", group=None,
         split_io: str = "whole"):
    """The CompiledModel exported at `path`, on `device` (a TensorParallelModel for a tensor-parallel artifact).

    target:  the target whose configuration you want (default: the one the artifact was compiled for);
             TargetError when the artifact was not built for it or for the device's kind.
    kernels: what runs the graph besides the torch reference:
             "auto"      on a CUDA device, the artifact's Triton cubins for the nodes they serve when a GPU
                         target's arch matches this GPU (kernels/<target>/triton/); on the CPU, the TVM host
                         library (kernels/host/tvm/) when the artifact has one and it fits this machine (arch,
                         OS, TVM minor version, CPU features); the torch reference for the rest. When they do
                         not fit (or fail to load): the reference alone, with a warning;
             "required"  the same, but an LmforgeError instead of the warning (and when the artifact has no
                         kernels for the device);
             "none"      the torch reference alone.
    group:   for a tensor-parallel artifact, this process's rank in a torch.distributed job
             (`lmforge.backends.collectives.TorchDistributedGroup()`, on device f"cuda:{local rank}"); None runs
             every rank as a thread of this process.
    split_io: with `group`, "whole" (whole tensors in and out: the KV caches are cut and all-gathered every call)
             or "local" (this rank's own cache parts in and out, nothing cut or gathered: what the cost model
             charges; see `lmforge.backends.collectives`).

        model = lmforge.load("out/tiny-llama")
        logits, k, v = model(tokens, k_cache, v_cache)
        gpu = lmforge.load("out/tiny-llama", device="cuda", kernels="required")
        cpu = lmforge.load("out/tiny-llama", kernels="required")   # the host TVM library, or an error
    """
    from dataclasses import replace

    from lmforge.backends import default_backends
    from lmforge.compiler import CompiledModel

    if kernels not in KERNEL_MODES:
        raise LmforgeError(f"kernels={kernels!r}: use one of {KERNEL_MODES}")
    root = artifact_dir(path)
    manifest = read_manifest(root)
    on_gpu = str(device).startswith("cuda")
    if kernels == "required" and not on_gpu and HOST_TVM_INDEX not in manifest["files"]:
        raise LmforgeError(f"kernels='required' on {device!r} asks for the artifact's TVM host library "
                           f"({HOST_TVM_DIR}/), and {manifest['name']!r} has none (GPU kernels run on a CUDA device: "
                           "load with device='cuda' on a GPU machine). Export a model compiled with "
                           "backends=('tvm',) (`lmforge export --target host --kernels`), or load with kernels='auto'")
    check_target(manifest, device, target)
    gpu_kernels = kernels != "none" and on_gpu
    host_kernels = kernels != "none" and not on_gpu and HOST_TVM_INDEX in manifest["files"]
    keep = (GRAPH_FILE, WEIGHTS_FILE) + tuple(rel for rel in manifest["files"]
                                              if gpu_kernels and re.fullmatch(r"kernels/[^/]+/triton/.+", rel)
                                              or host_kernels and rel.startswith(HOST_TVM_DIR + "/"))
    data = check_files(root, manifest, keep)
    graph = _parse_graph(data[GRAPH_FILE], manifest)
    _check_ops_present(graph, manifest)
    weights = _parse_weights(data[WEIGHTS_FILE], graph)
    graph = replace(graph, weights=weights)
    chosen = next((t["name"] for t in manifest["targets"] if target and t["name"].lower() == target.lower()),
                  manifest["target"])
    backends = default_backends(("torch",))
    triton_dir = _matching_triton_dir(manifest, data, device, kernels == "required") if gpu_kernels else None
    if triton_dir:
        cubins = _load_cubins(triton_dir, data, kernels == "required", graph)
        if cubins is None:
            triton_dir = None
        else:
            backends = [cubins, *backends]
    host_dir = None
    if host_kernels:
        host = _host_tvm_backend(manifest, data, kernels == "required")
        if host is not None:
            backends, host_dir = [host, *backends], HOST_TVM_DIR
    if graph.get_meta("tensor_parallel"):  # every rank runs the same program: the same kernels serve them all
        from lmforge.backends.collectives import TensorParallelModel

        model = TensorParallelModel(graph, backends, device, chosen, manifest["config"],
                                    manifest.get("pass_report", ""), group=group, split_io=split_io)
        model.kernel_source = triton_dir or host_dir
        model.config_source, model.objectives = manifest.get("config_source"), manifest.get("objectives") or None
        return model
    if group is not None or split_io != "whole":
        raise LmforgeError("group= / split_io= are for tensor-parallel artifacts; this one runs on one device: load "
                           "it without them")
    model = CompiledModel(graph, backends, device, chosen, manifest["config"], manifest.get("pass_report", ""))
    if host_dir and not any(k.backend == "tvm" for k in model.kernels):   # an index naming none of the nodes
        from lmforge.backends.triton.artifact_kernels import warn_or_raise

        warn_or_raise(f"artifact {manifest['name']!r}: its TVM host library ({HOST_TVM_DIR}/) serves no node of its "
                      "graph (the index names other nodes); the torch reference runs every node. Export the "
                      "artifact again", kernels == "required")
        host_dir = None
    model.kernel_source = triton_dir or host_dir  # where the kernels came from (None: the torch reference alone)
    model.config_source, model.objectives = manifest.get("config_source"), manifest.get("objectives") or None
    # the targets the artifact holds GPU kernels for (export warns that re-exporting does not carry them; the
    # host library's builds are carried over by the loaded model's TVM backend)
    model.artifact_kernel_targets = sorted({rel.split("/")[1] for rel in manifest["files"]
                                            if rel.startswith("kernels/") and rel.split("/")[1] != HOST})
    model.artifact_host_library = HOST_TVM_INDEX in manifest["files"]   # export warns when it is not carried over
    return model


def _host_tvm_backend(manifest: dict, data: dict[str, bytes], required: bool):
    """The HostLibraryBackend of kernels/host/tvm/ (files already hash-checked), or None after a warning when it
    does not fit this machine or fails to load (LmforgeError instead when `required`)."""
    from lmforge.backends.triton.artifact_kernels import warn_or_raise

    try:
        from lmforge.backends.tvm.host_library import host_backend, library_mismatch, read_index
    except Exception as e:   # TVM (or its lmforge backend) cannot be imported here
        reason = f"the TVM backend cannot be imported here ({type(e).__name__}: {e})"
    else:
        files = {rel[len(HOST_TVM_DIR) + 1:]: blob for rel, blob in data.items() if rel.startswith(HOST_TVM_DIR + "/")}
        index = read_index(data[HOST_TVM_INDEX], HOST_TVM_INDEX, files)
        reason = library_mismatch(index)
        if reason is None:
            try:
                return host_backend(index, files, HOST_TVM_DIR)
            except ArtifactError:
                raise
            except Exception as e:  # the dynamic loader or TVM refused a library
                reason = f"a library failed to load ({type(e).__name__}: {str(e)[:300]})"
    what = ("Export the artifact again on a machine of this kind, or load with kernels='auto' to run the torch "
            "reference" if required else "The torch reference runs instead")
    warn_or_raise(f"artifact {manifest['name']!r} has a TVM host library ({HOST_TVM_DIR}/) that cannot run here: "
                  f"{reason}. {what}", required)
    return None


def _matching_triton_dir(manifest: dict, data: dict[str, bytes], device, required: bool) -> str | None:
    """kernels/<target>/triton whose index is for the arch of `device`, or None after a warning (an
    LmforgeError when `required`)."""
    from lmforge.backends.triton.artifact_kernels import local_arch, read_index, warn_or_raise

    arch = local_arch(device)
    archs = {}
    for rel in sorted(data):
        if re.fullmatch(r"kernels/[^/]+/triton/index\.json", rel):
            archs[rel.rsplit("/", 1)[0]] = read_index(data[rel], rel).get("arch")
    matching = [d for d, a in archs.items() if a == arch]
    if matching:
        return matching[0]
    have = ", ".join(f"{d.split('/')[1]} ({a})" for d, a in archs.items()) or "none"
    what = ("Export it with add_gpu_kernels([...]) / `lmforge export --kernels` for a target of this GPU's arch"
            if required else "The torch reference runs on the GPU instead")
    warn_or_raise(f"artifact {manifest['name']!r} has no Triton kernels for this GPU ({arch}); it has: {have}. {what}",
                  required)
    return None


def _load_cubins(triton_dir: str, data: dict[str, bytes], required: bool, graph=None):
    """The CubinBackend of `triton_dir` (files already hash-checked), or None after a warning when a kernel
    cannot be loaded on this GPU (LmforgeError instead when `required`)."""
    from lmforge.backends.triton.artifact_kernels import DriverTooOld, load_kernels, read_index, warn_or_raise

    index = read_index(data[f"{triton_dir}/index.json"], f"{triton_dir}/index.json")
    files = {rel[len(triton_dir) + 1:]: blob for rel, blob in data.items() if rel.startswith(triton_dir + "/")}
    try:
        return load_kernels(index, files, triton_dir, graph)
    except ArtifactError:
        raise
    except DriverTooOld as exc:  # its message names both CUDA versions and what to do
        warn_or_raise(f"{exc}{'' if required else '. The torch reference runs instead'}.", required)
        return None
    except Exception as exc:  # the driver or Triton's runtime refused a binary (arch, version, resources)
        what = "Export the artifact again on this machine" if required else "The torch reference runs instead"
        warn_or_raise(f"the Triton kernels in {triton_dir} could not be loaded on this GPU ({type(exc).__name__}: "
                      f"{str(exc)[:300]}; built with Triton {index.get('triton_version')}). {what}", required)
        return None
