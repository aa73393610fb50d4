"""The TVM backend's host (LLVM) kernels as shared libraries in an artifact, and loading them back.

    kernels/host/tvm/
      index.json          machine, LLVM triple, target and its CPU features, TVM version, knob values, and
                          per graph node (by its first output's name) the builds that serve it; per library
                          its build's cache key, function name and argument signature
      00_linear.so ...    one shared library per distinct build (`export_library` of its runtime module)

Export (`host_kernel_files(compiled)`) takes every build the model's TVM kernels made so far (the shapes it was
called with) plus each kernel's main build (`OpKernel.main_variant`: the "gemm" build of a linear serves
every row count above the gemv rows), so a model that was never called still exports something useful.
One library per build rather than one for all: every build's function is named "main" (`compile_lowered`),
and linking them into one library would need each recompiled under another name, doubling the export's
build time; one file per build also lets the loader use the others when one does not fit.

Load (`host_backend(index, files)`) gives a `HostLibraryBackend`: the TVM backend itself (same kernel classes,
same argument order, output allocation and symbolic dims, so the same outputs), claiming only the nodes the
exported model ran with TVM, whose build cache starts with the libraries' functions. A build the library
lacks (a shape the model was not called with before export) is built on first use for the recorded target,
as the TVM backend would. Before a library function is used, the kernel is lowered again and its argument
signature compared with the recorded one: a different lmforge whose lowering changed builds afresh instead
of calling a function with the wrong arguments.

Loading a shared library runs its code (constructors run at dlopen). What protects the loader is the artifact's
sha256 check: `lmforge.artifact.load` hashes every file first and hands this module the verified bytes, which
are written to a fresh private directory and loaded from there (never from the artifact directory, which could
change between the check and the load). The hashes detect corruption, not a forger who rewrites the manifest
too: load artifacts from sources you trust.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from lmforge.backends.tvm.backend import TVMBackend
from lmforge.backends.tvm.build import BuildCache, OpKernel, cache_key
from lmforge.errors import ArtifactError

FORMAT_VERSION = 1
FOLDER = "tvm"                      # under kernels/host/
INDEX = "index.json"
_FILE = re.compile(r"\d{2,}_[a-z0-9_]+\.so")


def node_label(node) -> str:
    """The stable key of a node in the index: its first output's name (unique in a graph)."""
    return node.outputs[0].name if node.outputs else node.op


def key_text(full: tuple) -> str:
    """A build's full cache key as canonical JSON text (tuples become lists), how the index records it."""
    return json.dumps(full, separators=(",", ":"), default=repr)


def signature(lowered) -> dict[str, Any]:
    """The argument list of a lowered computation: inputs, scalars and outputs with dtype and shape (symbolic dims
    by name), in call order, and the structural hash of its PrimFunc ("structure": what it computes, so that two
    kernels of one argument list, cos and sin, are told apart)."""
    import tvm_ffi

    def tensor(t):
        return {"dtype": str(t.dtype), "shape": [int(d) if hasattr(d, "value") else str(d) for d in t.shape]}

    return {"inputs": [tensor(t) for t in lowered.inputs], "scalars": [str(v.dtype) for v in lowered.scalars],
            "outputs": [tensor(t) for t in lowered.outputs],
            "structure": str(tvm_ffi.structural_hash(lowered.prim_func()))}


# ---- what the library was built for -------------------------------------------------------------------------

def machine_info(target: dict) -> dict[str, Any]:
    """What a host library depends on: machine, LLVM triple, the target, its CPU features, the TVM version."""
    import tvm
    from tvm.target import codegen

    tvm_target = tvm.target.Target(target)
    return {"machine": platform.machine(), "triple": str(codegen.llvm_get_system_triple()),
            "target": dict(target), "target_string": str(tvm_target), "tvm_version": tvm.__version__,
            "features": sorted(str(f) for f in codegen.llvm_get_cpu_features(tvm_target))}


def fingerprint(info: Mapping[str, Any]) -> str:
    """16 hex digits naming the machine kind a host library runs on (like Hardware.fingerprint)."""
    keys = ("machine", "triple", "target_string", "tvm_version")
    return hashlib.sha256(json.dumps({k: info[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def _triple_os(triple: str) -> tuple[str, str]:
    parts = triple.split("-")   # arch-vendor-os[-env]; the vendor ("pc", "conda", "unknown") does not matter
    return parts[0], parts[2] if len(parts) > 2 else ""


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def library_mismatch(index: Mapping[str, Any]) -> str | None:
    """Why the host library of `index` cannot run here (None when it can). Conservative: another machine kind,
    another OS, a TVM of another minor version, or a CPU feature the library's target uses that LLVM does not
    report for this machine's CPU all count as not fitting."""
    if platform.machine() != index["machine"]:
        return f"it was built for {index['machine']} and this machine is {platform.machine()}"
    try:
        import tvm
        from tvm.target import codegen

        from lmforge.backends.tvm.target import host_target
    except Exception as e:  # not installed, or a broken install
        return f"TVM cannot be imported here ({type(e).__name__}: {e})"
    if _major_minor(tvm.__version__) != _major_minor(index["tvm_version"]):
        return f"it was built with TVM {index['tvm_version']} and this is TVM {tvm.__version__}"
    here = str(codegen.llvm_get_system_triple())
    if _triple_os(here) != _triple_os(index["triple"]):
        return f"it was built for {index['triple']} and this machine is {here}"
    have = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(host_target()))}
    missing = sorted(set(index["features"]) - have)
    if missing:
        return (f"its target {index['target_string']} uses CPU features this CPU lacks ({', '.join(missing[:6])}"
                f"{' ...' if len(missing) > 6 else ''})")
    return None


# ---- export -------------------------------------------------------------------------------------------------

def host_kernel_files(compiled) -> tuple[dict[str, bytes], str | None]:
    """({path under kernels/host/: bytes}, fingerprint) of the TVM host kernels of `compiled`; ({}, None) when
    its nodes run no TVM kernel built for the host. Builds each kernel's main variant first (see module doc)."""
    claimed = [(node, k.fn) for node, k in zip(compiled.graph.nodes, compiled.kernels)
               if k.backend == "tvm" and isinstance(k.fn, OpKernel) and k.fn.target.get("kind") == "llvm"]
    if not claimed:
        return {}, None
    knobs, target = dict(claimed[0][1].knobs), claimed[0][1].target
    # one knob set and target per library (a second TVM backend with other knobs: its nodes stay unexported)
    claimed = [(n, op) for n, op in claimed if dict(op.knobs) == knobs and op.target == target]
    info = machine_info(target)
    index: dict[str, Any] = {"format": FORMAT_VERSION, **info, "knobs": knobs, "nodes": {}, "libraries": {}}
    files: dict[str, bytes] = {}
    by_key: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-tvm-export-") as tmp:
        for node, op in claimed:
            # a failed build warns and is left out; a loaded model's library builds are carried over whole
            for variant in (op.main_variant, *getattr(op.cache, "variants", {}).get(node_label(node), ())):
                op.build_now(variant)
            served = []
            for variant, fn in list(op._fns.items()):
                if fn is None:
                    continue
                full = cache_key((op.key(), variant), op.knobs, op.target, op.family_of(variant))
                text = key_text(full)
                if text not in by_key:
                    name = by_key[text] = f"{len(by_key):02d}_{node.op}.so"
                    files[f"{FOLDER}/{name}"] = _library_bytes(op.cache, full, Path(tmp) / name)
                    index["libraries"][name] = {"key": json.loads(text), "function": "main", "op": node.op,
                                                "signature": signature(op.lower(variant))}
                served.append({"variant": json.loads(json.dumps(variant)), "library": by_key[text]})
            if served:
                index["nodes"][node_label(node)] = {"op": node.op, "kernel": type(op).__name__,
                                                    "computation": op.describe(), "builds": served}
    if not files:
        return {}, None
    files[f"{FOLDER}/{INDEX}"] = json.dumps(index, indent=1, sort_keys=True).encode()
    return files, fingerprint(info)


def _library_bytes(cache: BuildCache, full: tuple, path: Path) -> bytes:
    blob = getattr(cache, "blobs", {}).get(full)   # a model loaded from an artifact: the library it came with
    if blob is not None:
        return blob
    cache.module(full).export_library(str(path))
    return path.read_bytes()


# ---- load ---------------------------------------------------------------------------------------------------

def _typed(value, kind, what: str):
    if not isinstance(value, kind):
        raise ValueError(f"{what} is {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


def read_index(data: bytes, where: str, files: Mapping[str, bytes]) -> dict:
    """The index (ArtifactError when malformed, inconsistent, or naming a library the artifact does not hold): every
    field the loader reads has its type, the target is an LLVM one, and every library's key was built for it."""
    from lmforge.backends.tvm.target import target_key

    try:
        index = _typed(json.loads(data.decode("utf-8")), dict, "the index")
        if index.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {index.get('format')!r}")
        for key in ("machine", "triple", "target_string", "tvm_version"):
            _typed(index.get(key), str, key)
        for key in ("target", "knobs", "nodes", "libraries"):
            _typed(index.get(key), dict, key)
        if not all(isinstance(f, str) for f in _typed(index.get("features"), list, "features")):
            raise ValueError("features are not all strings")
        if index["target"].get("kind") != "llvm":
            raise ValueError(f"target {index['target']!r} is not a host (llvm) target")
        built_for = json.loads(json.dumps(target_key(index["target"])))
        for name, lib in index["libraries"].items():
            if not _FILE.fullmatch(name) or name not in files or _typed(lib, dict, name).get("function") != "main":
                raise ValueError(f"library {name!r} is not a file of the artifact")
            _typed(lib.get("op"), str, f"library {name!r}'s op")
            if len(_typed(lib.get("key"), list, f"library {name!r}'s key")) != 3 or lib["key"][2] != built_for:
                raise ValueError(f"library {name!r} was not built for the index's target {index['target']}")
            sig = _typed(lib.get("signature"), dict, f"library {name!r}'s signature")
            for part in ("inputs", "scalars", "outputs"):
                _typed(sig.get(part), list, f"library {name!r}'s signature {part}")
        for label, node in index["nodes"].items():
            _typed(node, dict, f"node {label!r}")
            _typed(node.get("op"), str, f"node {label!r}'s op")
            _typed(node.get("kernel"), str, f"node {label!r}'s kernel")
            for build in _typed(node.get("builds"), list, f"node {label!r}'s builds"):
                if _typed(build, dict, f"a build of node {label!r}").get("library") not in index["libraries"]:
                    raise ValueError(f"node {label!r} names a library the index does not list")
                if "variant" not in build:
                    raise ValueError(f"a build of node {label!r} has no variant")
                if index["libraries"][build["library"]]["op"] != node["op"]:
                    raise ValueError(f"node {label!r} ({node['op']}) names a library of another op")
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{where} is not a valid host kernel index ({type(e).__name__}: {e}); export the "
                            "artifact again") from None
    return index


class LibraryCache(BuildCache):
    """A build cache that starts with an artifact's library functions, keyed by their builds' full keys.

    `get` returns a library's module when the kernel's lowering has the recorded signature, else builds as
    BuildCache does. `blobs` keeps each library's bytes so that exporting the loaded model carries them over."""

    def __init__(self, libraries: Mapping[str, tuple[Any, dict, bytes]]):
        super().__init__()
        self._library = dict(libraries)   # key text -> (runtime module, signature, bytes)
        self.blobs: dict[tuple, bytes] = {}
        self.variants: dict[str, list] = {}   # node label -> the variants its library builds serve

    def get(self, key, lower, knobs, target, family):
        full = cache_key(key, knobs, target, family)
        entry = self._library.pop(key_text(full), None)
        if entry is not None and full not in self._built:
            module, recorded, blob = entry
            lowered = lower()
            if signature(lowered) == recorded:
                self._built[full] = module
                self.blobs[full] = blob
                self.stats.from_library += 1
            else:
                warnings.warn(f"the host library's build of {key[0][0]!r} takes {recorded} but this lmforge lowers "
                              f"it to {signature(lowered)}; building it again instead")
        return super().get(key, lower, knobs, target, family)


class HostLibraryBackend(TVMBackend):
    """The TVM backend of a loaded artifact: the nodes the exported model ran with TVM, from its host library."""

    def __init__(self, index: Mapping[str, Any], cache: LibraryCache, source: str):
        super().__init__(index["knobs"], cache=cache)
        self.target = dict(index["target"])   # the library's target: the cache keys and any new build use it
        self.nodes = dict(index["nodes"])
        self.source = source

    def claim(self, node, device):
        entry = self.nodes.get(node_label(node))
        if entry is None or entry["op"] != node.op:
            return None
        kernel = super().claim(node, device)
        if kernel is None or type(kernel.fn).__name__ != entry["kernel"]:
            return None
        return replace(kernel, detail=f"{kernel.detail} (host library)")


def host_backend(index: Mapping[str, Any], files: Mapping[str, bytes], source: str) -> HostLibraryBackend:
    """The backend running `index`'s libraries. `files` are their verified bytes (name -> bytes): each is written
    to a private temporary directory, loaded from there, and the directory removed (see the module doc)."""
    import tvm

    if str(tvm.target.Target(index["target"])) != index["target_string"]:
        raise ArtifactError(f"the host kernel index's target {index['target']} is not its recorded target "
                            f"{index['target_string']}; export the artifact again")
    libraries = {}
    tmp = tempfile.mkdtemp(prefix="lmforge-tvm-load-")   # mode 0700: nobody else can swap a file in
    try:
        for name, lib in index["libraries"].items():
            path = Path(tmp) / name
            path.write_bytes(files[name])
            module = tvm.runtime.load_module(str(path))
            module[lib["function"]]   # resolve now: a library without its function fails the load, not a call
            libraries[key_text(lib["key"])] = (module, lib["signature"], files[name])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # dlopen keeps the mapping; nothing is read from disk again
    cache = LibraryCache(libraries)
    cache.variants = {label: [_variant(b["variant"]) for b in node["builds"]] for label, node in index["nodes"].items()}
    return HostLibraryBackend(index, cache, source)


def _variant(value):
    """A variant as the kernels name it (JSON made its tuples lists)."""
    return tuple(_variant(v) for v in value) if isinstance(value, list) else value
