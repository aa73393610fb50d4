"""Ahead-of-time builds of Triton kernels for a named GPU, on any machine (no GPU needed), and resource pruning.

`build` compiles one @triton.jit function for one config to PTX and a cubin for sm_80 / sm_89 / sm_90 with
Triton's own compiler pipeline (`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`), then
runs Triton's bundled ptxas with `-v` on the PTX to read registers and spills. `prune_configs` uses that to
drop the configs of a tuning space that fail to compile or exceed the target's limits (registers per
thread, shared memory per block), each with its reason, before anything is measured; the same staged
pruning Triton's autotuner does, but for a GPU that need not be present.

Specialisation mirrors the JIT so the AOT kernel is the one the JIT would run: pointers are assumed
16-byte aligned and integer arguments named in `divisible_by_16` get `tt.divisibility = 16` (the hints
that enable vectorised loads and software pipelining); a stride that is 1 is passed as a constexpr.

    spec = KernelSpec("rmsnorm_fp16", norms._rmsnorm_kernel, {"x_ptr": "*fp16", ...}, {"ONE_PASS": True, ...},
                      norms.DEFAULT_CONFIGS["rmsnorm"])
    binary = build_spec(spec, "sm_90")       # KernelBinary: ptx, cubin, metadata (registers, smem, ...)
    save(binary, "kernels/sm_90"); load("kernels/sm_90", binary.name)

Files written by `save` are plain text / bytes / JSON (never pickle); `load` checks their sha256. Each record
names the PTX ISA of its PTX (`ptx_version`, e.g. "8.7") and the CUDA version of the ptxas that assembled its
cubin (`ptxas_version`, e.g. "12.9"): a driver older than that CUDA major version cannot load the cubin.

Portable builds (`BuildRequest(..., portable=True)`, what artifact exports ask for): a GPU machine with a CUDA 12
driver cannot load a cubin from a CUDA 13 ptxas, and Triton 3.9 assembles sm_90 with its bundled CUDA 13
`ptxas-blackwell` and PTX ISA 9.x. A portable build for an architecture below sm_100 asks Triton for PTX ISA 8.7
(`PORTABLE_PTX_VERSION`, CUDA 12.8) and makes `triton.compile` assemble it with Triton's pre-Blackwell CUDA 12
`ptxas` (knobs.nvidia.ptxas, overridable with TRITON_PTXAS_PATH), for the duration of the build only; its
resource report comes from that same ptxas. Under Triton 3.6 get_ptxas(90) is already that ptxas. Other
builds (`build`, `build_spec` unless asked; `prune_configs`, the kernel model) keep Triton's defaults, what its
JIT would run on this machine.

A process that runs Triton's interpreter (TRITON_INTERPRET=1: the CPU tests) cannot also compile for a
GPU, so `build_many` then hands the whole batch to one child Python process without the interpreter;
the child imports each kernel by module and name and sends the binaries back through `save` / `load`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import triton

from lmforge.backends.triton.config import KernelConfig
from lmforge.errors import ArtifactError, LmforgeError, TargetError

KB = 1024
PORTABLE_PTX_VERSION = 87   # PTX ISA 8.7 (CUDA 12.8): what the Triton 3.6 JIT emits for sm_90


@dataclass(frozen=True)
class ArchLimits:
    """Per-block resource limits of one GPU architecture (CUDA programming guide, compute capabilities)."""

    arch: str
    capability: int
    max_registers_per_thread: int
    max_shared_bytes_per_block: int
    max_threads_per_block: int = 1024
    registers_per_block: int = 64 * KB


ARCH_LIMITS: dict[str, ArchLimits] = {
    "sm_80": ArchLimits("sm_80", 80, 255, 163 * KB),   # A100
    "sm_89": ArchLimits("sm_89", 89, 255, 99 * KB),    # L4 / L40 / RTX 40xx
    "sm_90": ArchLimits("sm_90", 90, 255, 227 * KB),   # H100 / H200
}


@dataclass(frozen=True)
class KernelSpec:
    """A kernel template ready to build: the function, its runtime argument types and its fixed constexprs.

    `signature` maps every runtime argument to a Triton type ("*fp16", "*u8", "i32", "fp32", ...);
    `constexprs` holds the constexpr arguments that are not tuning knobs (BITS, HAS_BIAS, ...); the knobs
    come from a KernelConfig at build time. `divisible_by_16` names integer arguments known to be
    multiples of 16 (row strides, feature sizes). `adapt` maps a candidate config to the one the launcher
    would really run for this problem (e.g. a tile clamped to the row length), so AOT builds what runs.
    """

    name: str
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    config: KernelConfig
    divisible_by_16: tuple[str, ...] = ()
    adapt: Callable[[KernelConfig], KernelConfig] | None = None


@dataclass(frozen=True)
class KernelBinary:
    """One compiled kernel for one architecture: PTX text, cubin bytes and the metadata needed to launch it."""

    name: str
    arch: str
    ptx: str
    cubin: bytes
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ResourceReport:
    """What one compiled kernel uses per thread and per block."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int
    stack_bytes: int = 0

    @classmethod
    def of(cls, binary: KernelBinary) -> "ResourceReport":
        m = binary.metadata
        return cls(m["registers"], m["spill_stores"], m["spill_loads"], m["shared"], m["num_warps"],
                   m.get("stack_bytes", 0))


def arch_limits(arch: str) -> ArchLimits:
    if arch not in ARCH_LIMITS:
        raise TargetError(f"unknown GPU architecture {arch!r}; AOT builds support {sorted(ARCH_LIMITS)}.")
    return ARCH_LIMITS[arch]


def violations(report: ResourceReport, limits: ArchLimits) -> list[str]:
    """Every limit of `limits` that `report` exceeds, as readable sentences (empty when it fits)."""
    found = []
    threads = report.num_warps * 32
    if report.registers > limits.max_registers_per_thread:
        found.append(f"{report.registers} registers per thread > {limits.max_registers_per_thread}")
    if report.shared_bytes > limits.max_shared_bytes_per_block:
        found.append(f"{report.shared_bytes} bytes of shared memory > {limits.max_shared_bytes_per_block} "
                     f"per block on {limits.arch}")
    if threads > limits.max_threads_per_block:
        found.append(f"{threads} threads per block > {limits.max_threads_per_block}")
    if report.registers * threads > limits.registers_per_block:
        found.append(f"{report.registers} registers x {threads} threads > {limits.registers_per_block} "
                     f"registers per block")
    return found


def fits(report: ResourceReport, limits: ArchLimits) -> bool:
    """True when the kernel can launch on that architecture (see `violations` for the reasons it cannot)."""
    return not violations(report, limits)


def _as_jit_function(fn):
    """`fn` itself when it is a JITFunction (what @triton.jit gives outside the interpreter)."""
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise LmforgeError(f"AOT build needs a @triton.jit function, got {fn!r}.")
    return fn


def _full_signature(fn, signature: Mapping[str, str], constexprs: Mapping[str, Any]) -> dict[str, str]:
    """Every argument of `fn` -> its type, "constexpr" for those given a value; LmforgeError if one is left."""
    arg_names = list(getattr(fn, "arg_names", None) or [])
    if not arg_names:
        raise LmforgeError(f"AOT build needs a @triton.jit function, got {fn!r}.")
    unknown = (set(signature) | set(constexprs)) - set(arg_names)
    if unknown:
        raise LmforgeError(f"{fn.__name__} has no arguments {sorted(unknown)}; its arguments are {arg_names}.")
    full_signature, missing = {}, []
    for name in arg_names:
        if name in constexprs:
            full_signature[name] = "constexpr"
        elif name in signature:
            full_signature[name] = signature[name]
        else:
            missing.append(name)
    if missing:
        raise LmforgeError(f"AOT build of {fn.__name__}: give a type (signature) or a value (constexprs / "
                           f"config) for {missing}.")
    return full_signature


def _all_constexprs(request: "BuildRequest") -> dict[str, Any]:
    """The request's constexprs plus the config's params that are arguments of the kernel (params win)."""
    arg_names = set(getattr(request.fn, "arg_names", None) or [])
    return {**dict(request.constexprs), **{k: v for k, v in request.config.params if k in arg_names}}


def _source(jit_fn, signature: Mapping[str, str], constexprs: Mapping[str, Any], divisible: Iterable[str]):
    from triton.compiler import ASTSource

    arg_names = list(jit_fn.arg_names)
    full_signature = _full_signature(jit_fn, signature, constexprs)
    divisible = set(divisible)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(arg_names)
             if name not in constexprs and (full_signature[name].startswith("*") or name in divisible)}
    return ASTSource(jit_fn, full_signature, dict(constexprs), attrs)


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton uses for `capability`; the helper's name and return type changed across Triton versions."""
    from triton.backends.nvidia import compiler as nv

    tool = None
    getter = getattr(nv, "get_ptxas", None)
    if getter is not None:
        try:
            tool = getter(capability)
        except TypeError:
            tool = getter()
    if tool is None:
        getter = getattr(nv, "_path_to_binary", None)
        tool = getter("ptxas") if getter is not None else None
    if isinstance(tool, tuple):
        tool = tool[0]
    path = getattr(tool, "path", tool)
    if not path:
        raise LmforgeError("could not find Triton's bundled ptxas; reinstall triton (it ships one).")
    return str(path)


@lru_cache(maxsize=None)
def ptxas_version(path: str) -> str:
    """The CUDA release of a ptxas binary ("12.9"), from `ptxas --version`."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    except OSError as exc:
        raise LmforgeError(f"could not run ptxas at {path} ({exc}); reinstall triton (it ships one).") from None
    found = re.search(r"release (\d+\.\d+)", out)
    if found is None:
        raise LmforgeError(f"{path} --version does not name a CUDA release:\n{out[-500:]}")
    return found.group(1)


@contextmanager
def _cuda12_ptxas(capability: int):
    """Within it, `triton.compile` for sm_<capability> (< 100) assembles with Triton's CUDA 12 ptxas; yields its path.

    Triton 3.9 picks `knobs.nvidia.ptxas_blackwell` (CUDA 13) for sm_90: it is pointed at the pre-Blackwell
    `knobs.nvidia.ptxas` inside a knobs scope, which restores the knobs and their environment variables after.
    Triton 3.6 already uses that ptxas below sm_100. LmforgeError when no CUDA 12 ptxas is found.
    """
    nv_knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nv_knobs is None:                      # a Triton without knobs: its own choice must already be CUDA 12
        path = _ptxas_path(capability)
        _require_cuda12(path)
        yield path
        return
    cuda12 = nv_knobs.ptxas.path
    _require_cuda12(cuda12)
    with nv_knobs.scope():
        nv_knobs.ptxas_blackwell = cuda12
        chosen = _ptxas_path(capability)
        if Path(chosen).resolve() != Path(cuda12).resolve():
            raise LmforgeError(f"Triton {triton.__version__} assembles sm_{capability} with {chosen}, not with the "
                               f"CUDA 12 ptxas {cuda12} lmforge asked for: portable builds do not support this "
                               "Triton; export with Triton 3.6 - 3.9.")
        yield cuda12


def _require_cuda12(path: str) -> None:
    """LmforgeError unless `path` is a ptxas of CUDA 12.8 or newer 12.x (the first to accept PTX ISA 8.7)."""
    version = ptxas_version(path)
    major, minor = (int(x) for x in version.split("."))
    if major != 12 or minor < 8:
        raise LmforgeError(f"the ptxas for portable builds ({path}) is CUDA {version}, not CUDA 12.8 - 12.x: its "
                           "cubins may not load on CUDA 12 drivers, or it cannot read PTX ISA 8.7. Point "
                           "TRITON_PTXAS_PATH at a ptxas of CUDA 12.8 or a later 12.x, or export with Triton 3.6 - "
                           "3.9, which bundle one.")


_PTXAS_NUMBERS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack_bytes": r"(\d+) bytes stack frame",
    "static_smem": r"(\d+) bytes smem",
}


def ptxas_resources(ptx: str, capability: int, ptxas: str | None = None) -> dict[str, int]:
    """Registers, spills, stack and static shared memory that ptxas -v reports for the PTX's kernel.

    `ptxas`: the binary to run (the one that made the cubin); default: the one Triton uses for `capability`.
    """
    gpu_name = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [ptxas or _ptxas_path(capability), "-v", f"--gpu-name={gpu_name}", str(src), "-o", str(Path(tmp) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise LmforgeError(f"ptxas failed on the kernel's PTX for {gpu_name}:\n{log[-2000:]}")
    return {key: sum(int(v) for v in re.findall(pattern, log)) for key, pattern in _PTXAS_NUMBERS.items()}


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _default_name(fn_name: str, arch: str, signature, constexprs, config: KernelConfig,
                  portable: bool = False) -> str:
    key = json.dumps([sorted(signature.items()), sorted((k, _jsonable(v)) for k, v in constexprs.items()),
                      config.to_dict()] + (["portable"] if portable else []), sort_keys=True, default=str)
    return f"{fn_name}_{arch}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class BuildRequest:
    """One kernel to build: a @triton.jit function, its argument types and constexprs, a config, a target.

    `portable`: PTX ISA 8.7 assembled by a CUDA 12 ptxas below sm_100, for cubins CUDA 12 drivers load (see
    the module docstring); False: Triton's defaults (its newest ptxas and PTX ISA for the target).
    """

    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    config: KernelConfig
    arch: str
    divisible_by_16: tuple[str, ...] = ()
    name: str | None = None
    portable: bool = False


def _build_one(request: BuildRequest) -> KernelBinary:
    """Compile in this process (which must not be in interpreter mode)."""
    limits = arch_limits(request.arch)
    if request.portable and limits.capability < 100:
        with _cuda12_ptxas(limits.capability) as ptxas:
            return _compile(request, limits, {"ptx_version": PORTABLE_PTX_VERSION}, ptxas)
    return _compile(request, limits, {}, _ptxas_path(limits.capability))


def _compile(request: BuildRequest, limits: ArchLimits, extra_options: dict, ptxas: str) -> KernelBinary:
    """triton.compile for the request; `ptxas`: the binary Triton assembles with (read back for resources)."""
    from triton.backends.compiler import GPUTarget

    jit_fn = _as_jit_function(request.fn)
    config = request.config
    all_constexprs = _all_constexprs(request)
    src = _source(jit_fn, request.signature, all_constexprs, request.divisible_by_16)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, **extra_options}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", limits.capability, 32), options=options)
    except Exception as exc:  # the compiler raises many types (CompilationError, PTXASError, RuntimeError)
        raise LmforgeError(f"Triton could not compile {jit_fn.__name__} for {request.arch} with "
                           f"{config.to_dict()}: {type(exc).__name__}: {str(exc)[:1500]}") from exc
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    raw = getattr(jit_fn, "fn", jit_fn)
    ptx_isa = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, flags=re.MULTILINE)
    metadata = {
        "kernel": jit_fn.__name__, "entry": meta.name, "module": raw.__module__, "qualname": raw.__qualname__,
        "arg_names": list(jit_fn.arg_names), "triton_metadata": _triton_metadata(compiled), "num_warps": meta.num_warps,
        "num_stages": meta.num_stages, "num_ctas": getattr(meta, "num_ctas", 1), "shared": meta.shared,
        **ptxas_resources(ptx, limits.capability, ptxas), "signature": dict(request.signature),
        "constexprs": {k: _jsonable(v) for k, v in all_constexprs.items()},
        "config": config.to_dict(), "divisible_by_16": sorted(set(request.divisible_by_16)),
        "triton_version": triton.__version__, "capability": limits.capability,
        "ptx_version": ptx_isa.group(1) if ptx_isa else None, "ptxas_version": ptxas_version(ptxas),
        "portable": bool(extra_options),
    }
    name = request.name or _default_name(jit_fn.__name__, request.arch, request.signature, all_constexprs, config,
                                         request.portable)
    return KernelBinary(name, request.arch, ptx, bytes(compiled.asm["cubin"]), metadata)


def _triton_metadata(compiled) -> dict:
    """Triton's own metadata of a compiled kernel as the JSON object its cache stores (what
    triton.compiler.CompiledKernel reads back to launch the binary; see cubin_runner)."""
    group = getattr(compiled, "metadata_group", None) or {}
    path = next((p for key, p in group.items() if key.endswith(".json")), None)
    if path is not None and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return json.loads(json.dumps(compiled.metadata._asdict(), default=vars))


def _build_or_reason(request: BuildRequest) -> KernelBinary | str:
    try:
        return _build_one(request)
    except LmforgeError as exc:
        return str(exc)


def _interpreting(requests: list[BuildRequest]) -> bool:
    knobs = getattr(triton, "knobs", None)
    flag = knobs.runtime.interpret if knobs is not None else os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(flag) or any(type(r.fn).__name__ == "InterpretedFunction" for r in requests)


# ---- builds in a fresh process (when this one runs the interpreter) -------------------------------------

def _encode_value(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, triton.language.dtype):
        return {"tl.dtype": value.name}
    raise LmforgeError(f"cannot pass the constexpr {value!r} ({type(value).__name__}) to an AOT build process; "
                       "use ints, floats, bools, strings or triton.language dtypes.")


def _decode_value(value):
    return triton.language.dtype(value["tl.dtype"]) if isinstance(value, dict) else value


def _encode_request(request: BuildRequest) -> dict:
    raw = getattr(request.fn, "fn", request.fn)
    return {"module": raw.__module__, "qualname": raw.__qualname__, "file": inspect.getsourcefile(raw),
            "signature": dict(request.signature),
            "constexprs": {k: _encode_value(v) for k, v in request.constexprs.items()},
            "config": request.config.to_dict(), "arch": request.arch,
            "divisible_by_16": list(request.divisible_by_16), "name": request.name, "portable": request.portable}


def _resolve_function(module_name: str, qualname: str, file: str | None):
    """The kernel object named module.qualname, importing the module by name or else from its file."""
    from lmforge.backends.triton import elementwise

    try:
        obj = importlib.import_module(module_name)
    except ImportError:
        if not file:
            raise
        if module_name.startswith(elementwise.MODULE_PREFIX):   # generated from a graph: keep its own name
            obj = elementwise.generated_module(module_name, Path(file).read_text())
        else:
            spec = importlib.util.spec_from_file_location(f"_lmforge_aot_{Path(file).stem}", file)
            obj = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(obj)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode_request(data: dict) -> BuildRequest:
    fn = _resolve_function(data["module"], data["qualname"], data["file"])
    return BuildRequest(fn, data["signature"], {k: _decode_value(v) for k, v in data["constexprs"].items()},
                        KernelConfig.from_dict(data["config"]), data["arch"], tuple(data["divisible_by_16"]),
                        data["name"], data.get("portable", False))


def _build_in_subprocess(requests: list[BuildRequest]) -> list[KernelBinary | str]:
    """Run the builds in `python -c ...worker_main()` without TRITON_INTERPRET; binaries come back via save/load."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {"out": tmp, "requests": [_encode_request(r) for r in requests]}
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        paths = [os.getcwd() if p == "" else p for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if os.path.isdir(p))
        cmd = [sys.executable, "-c", "from lmforge.backends.triton.aot import worker_main; worker_main()"]
        proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env)
        results_file = Path(tmp) / "results.json"
        if proc.returncode != 0 or not results_file.exists():
            raise LmforgeError(f"the AOT build process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results = json.loads(results_file.read_text())
        return [load(tmp, r["name"]) if "name" in r else r["error"] for r in results]


def worker_main() -> None:
    """Entry point of the build process: a JSON job on stdin, binaries and results.json into job["out"]."""
    job = json.loads(sys.stdin.read())
    results = []
    for data in job["requests"]:
        try:
            result = _build_or_reason(_decode_request(data))
        except Exception as exc:  # a kernel that cannot even be imported is reported, not fatal to the batch
            result = f"could not load {data['module']}.{data['qualname']}: {type(exc).__name__}: {exc}"
        if isinstance(result, str):
            results.append({"error": result})
        else:
            save(result, job["out"])
            results.append({"name": result.name})
    (Path(job["out"]) / "results.json").write_text(json.dumps(results))


def build_many(requests: Iterable[BuildRequest]) -> list[KernelBinary | str]:
    """Build every request; each result is a KernelBinary or the message saying why it failed to compile.

    Requests that are malformed (unknown target, an argument with neither a type nor a value) raise
    LmforgeError / TargetError at once.

    In a process running Triton's interpreter (TRITON_INTERPRET=1, e.g. tests on a CPU-only machine)
    @triton.jit produced interpreter objects all the way down (triton.language included), which the GPU
    compiler cannot use; the builds then run together in one fresh Python process without the interpreter.
    """
    requests = list(requests)
    for request in requests:  # the caller's mistakes are raised here, before anything is compiled
        arch_limits(request.arch)
        _full_signature(request.fn, request.signature, _all_constexprs(request))
    if _interpreting(requests):
        return _build_in_subprocess(requests)
    return [_build_or_reason(r) for r in requests]


def build(kernel_fn, signature: Mapping[str, str], constexprs: Mapping[str, Any], config: KernelConfig,
          arch: str, divisible_by_16: Iterable[str] = (), name: str | None = None,
          portable: bool = False) -> KernelBinary:
    """Compile `kernel_fn` with `config` for `arch` ("sm_80" | "sm_89" | "sm_90") -> KernelBinary.

    The config's params that are arguments of the kernel become constexprs (they override `constexprs`);
    num_warps / num_stages become compiler options; `portable`: see BuildRequest. Raises LmforgeError when
    compilation fails.
    """
    request = BuildRequest(kernel_fn, dict(signature), dict(constexprs), config, arch, tuple(divisible_by_16), name,
                           portable)
    result = build_many([request])[0]
    if isinstance(result, str):
        raise LmforgeError(result)
    return result


def spec_request(spec: KernelSpec, arch: str, config: KernelConfig | None = None,
                 portable: bool = False) -> BuildRequest:
    """The BuildRequest for a KernelSpec: its default config unless `config` is given, adapted by spec.adapt."""
    config = config or spec.config
    if spec.adapt is not None:
        config = spec.adapt(config)
    name = _default_name(spec.name, arch, spec.signature, {**dict(spec.constexprs), **dict(config.params)}, config,
                         portable)
    return BuildRequest(spec.fn, dict(spec.signature), dict(spec.constexprs), config, arch,
                        tuple(spec.divisible_by_16), name, portable)


def build_spec(spec: KernelSpec, arch: str, config: KernelConfig | None = None,
               portable: bool = False) -> KernelBinary:
    """`build` for a KernelSpec (see `spec_request`)."""
    result = build_many([spec_request(spec, arch, config, portable)])[0]
    if isinstance(result, str):
        raise LmforgeError(result)
    return result


def prune_configs(kernel: KernelSpec, configs: Iterable[KernelConfig], arch: str,
                  max_spill_bytes: int | None = None
                  ) -> tuple[list[KernelConfig], list[tuple[KernelConfig, str]]]:
    """Split `configs` into those that compile and fit `arch` and those dropped, each with its reason.

    `max_spill_bytes` (optional) also drops configs whose register spills exceed it.
    """
    limits = arch_limits(arch)
    configs = list(configs)
    kept, dropped = [], []
    for config, result in zip(configs, build_many(spec_request(kernel, arch, c) for c in configs)):
        if isinstance(result, str):
            dropped.append((config, f"does not compile: {result.splitlines()[0][:300]}"))
            continue
        report = ResourceReport.of(result)
        reasons = violations(report, limits)
        spills = report.spill_stores + report.spill_loads
        if max_spill_bytes is not None and spills > max_spill_bytes:
            reasons.append(f"{spills} bytes of register spills > {max_spill_bytes}")
        if reasons:
            dropped.append((config, "; ".join(reasons)))
        else:
            kept.append(config)
    return kept, dropped


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ArtifactError(f"kernel name {name!r} is not a safe file name (letters, digits, _ . - only).")


def save(binary: KernelBinary, directory) -> Path:
    """Write <name>.ptx, <name>.cubin and <name>.json (launch metadata + sha256 of both) into `directory`."""
    _check_name(binary.name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ptx_bytes = binary.ptx.encode()
    (out / f"{binary.name}.ptx").write_bytes(ptx_bytes)
    (out / f"{binary.name}.cubin").write_bytes(binary.cubin)
    record = {"schema": 1, "name": binary.name, "arch": binary.arch, "metadata": binary.metadata,
              "sha256": {"ptx": _sha256(ptx_bytes), "cubin": _sha256(binary.cubin)}}
    path = out / f"{binary.name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def load(directory, name: str) -> KernelBinary:
    """Read a kernel written by `save`, checking that every file is present and unchanged."""
    _check_name(name)
    base = Path(directory)
    try:
        record = json.loads((base / f"{name}.json").read_text())
        ptx_bytes = (base / f"{name}.ptx").read_bytes()
        cubin = (base / f"{name}.cubin").read_bytes()
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"kernel {name!r} in {base} is missing or unreadable ({exc}); rebuild it with "
                            "lmforge.backends.triton.aot.build and save().") from exc
    if record.get("schema") != 1 or record.get("name") != name:
        raise ArtifactError(f"{base / (name + '.json')} is not a kernel record of schema 1 for {name!r}.")
    for label, data in (("ptx", ptx_bytes), ("cubin", cubin)):
        if record["sha256"].get(label) != _sha256(data):
            raise ArtifactError(f"{base / (name + '.' + label)} does not match its recorded sha256: the file "
                                "was changed or truncated; rebuild the kernel.")
    return KernelBinary(name, record["arch"], ptx_bytes.decode(), cubin, record["metadata"])
