"""Launching an artifact's Triton cubins with Triton's own runtime, without compiling anything.

`CubinKernel(record, ptx, cubin)` rebuilds a `triton.compiler.CompiledKernel` from the files an artifact
holds for one kernel (written by lmforge.backends.triton.aot.save): Triton's metadata JSON (the one its
cache stores), the PTX and the cubin. CompiledKernel's constructor reads exactly such a "metadata group"
(name -> file path), so the files go to a temporary directory for the constructor and the directory is
removed afterwards. The kernel's source (an ASTSource of the @triton.jit function, imported by module and
name, or for a kernel generated from the graph from the source its record carries, once load_kernels has
checked that source is what lmforge generates from the graph's region, with the same signature,
constexprs and divisibility attributes as at build time) gives the launcher its argument layout; nothing is
recompiled and nothing is unpickled. Loading the module on the GPU (`CompiledKernel._init_handles`, via the
driver's `load_binary`) happens in the constructor here, so a cubin that does not fit the device fails at load,
not at the first call.

    kernel = CubinKernel(record, ptx, cubin)                 # on a machine with a matching GPU
    kernel.launch(grid, values)                              # values: argument name -> tensor / int / float

`ordered_args` and launch_specs.grid_of are the pure parts (argument order and grid from the metadata);
tests check them on the CPU against the JIT launchers. The rest needs a GPU: benchmarks/gpu_cases/artifact.py
exercises it end to end.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

from lmforge.errors import LmforgeError


def ordered_args(metadata: Mapping[str, Any], values: Mapping[str, Any]) -> list:
    """Every argument of the kernel in its declared order: runtime values from `values`, constexprs from the
    metadata (Triton's launcher takes all of them positionally and skips the constexprs)."""
    constexprs = metadata["constexprs"]
    args = []
    for name in metadata["arg_names"]:
        if name in constexprs:
            args.append(constexprs[name])
        elif name in values:
            args.append(values[name])
        else:
            raise LmforgeError(f"kernel {metadata['kernel']} needs argument {name!r}, which the launch spec did not "
                               "give; the artifact and this lmforge disagree: export the artifact again")
    return args


def _source(metadata: Mapping[str, Any]):
    """The ASTSource the kernel was built from: same function, signature, constexprs and attributes."""
    from lmforge.backends.triton import aot

    if metadata.get("source") is not None:      # a kernel generated from the graph: its module comes from the record
        from lmforge.backends.triton.elementwise import generated_module

        module = generated_module(metadata["module"], metadata["source"])
    else:
        module = importlib.import_module(metadata["module"])
    fn = module
    for part in metadata["qualname"].split("."):
        fn = getattr(fn, part)
    if list(getattr(fn, "arg_names", [])) != list(metadata["arg_names"]):
        raise LmforgeError(f"{metadata['module']}.{metadata['qualname']} now takes {getattr(fn, 'arg_names', None)}, "
                           f"but the artifact's kernel was built for {metadata['arg_names']}; export it again")
    return aot._source(fn, metadata["signature"], metadata["constexprs"], metadata["divisible_by_16"])


class CubinKernel:
    """One artifact kernel loaded on the current CUDA device, launchable with a grid and named arguments."""

    def __init__(self, name: str, metadata: Mapping[str, Any], ptx: str, cubin: bytes):
        from triton.compiler.compiler import CompiledKernel

        self.name = name
        self.metadata = metadata
        triton_meta = metadata["triton_metadata"]
        with tempfile.TemporaryDirectory() as tmp:
            entry = triton_meta["name"]
            group = {}
            for suffix, data in ((".json", json.dumps(triton_meta).encode()), (".ptx", ptx.encode()),
                                 (".cubin", cubin)):
                path = Path(tmp) / f"{entry}{suffix}"
                path.write_bytes(data)
                group[path.name] = str(path)
            self.compiled = CompiledKernel(_source(metadata), group, hashlib.sha256(cubin).hexdigest())
            self.compiled._init_handles()  # load the module now: a bad cubin fails at load, not mid-model

    def launch(self, grid: tuple[int, int, int], values: Mapping[str, Any]) -> None:
        self.compiled[grid](*ordered_args(self.metadata, values))
