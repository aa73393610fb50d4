"""An exported artifact's Triton cubins, loaded and launched on this GPU: correctness and decode-step time.

For the example Llama ("5m" preset, random weights, fp16), its int4 weight-only variant (group size 64) and
its block top-k decode variant (blocks of 16, 2 chosen besides the sink and 32-token window blocks):
compile the decode step, build its Triton kernels ahead of time for this GPU's arch
(`add_gpu_kernels([target], backends=("triton",))`), export to a temporary directory, and load it back with
`lmforge.load(path, device="cuda", kernels="required")` (which raises unless the cubins load). Then:

    kernel      the loaded artifact's decode step (cubins for the nodes they serve, attention included: split-K
                decode, or block top-k's score / top-k / sparse split / merge; the torch reference for the rest)
    reference   the same graph run by the torch reference on the GPU (fp32 math where the ops do it)
    baselines   the JIT Triton backend (lmforge.compile(..., backends=("triton", "torch")) on the GPU), and
                torch eager (the nn.Module; not for block top-k, which computes something else), each in its
                own row

Outputs compared: the logits of one decode step at batch 1 with 128 cached positions. The note says how many
nodes the cubins serve (and how many of them are attention) and how many calls fell back to the reference
(should be 0).
"""
from __future__ import annotations

import tempfile

import torch

from benchmarks.gpu_cases import Pending
from examples.models.llama import Llama, LlamaConfig, LlamaDecodeStep
from lmforge.backends.triton.launch_specs import ATTENTION_OPS

PRESET = "5m"
BATCH, PAST = 1, 128
INT4 = {"quant.weight_bits": 4, "quant.group_size": 64, "quant.lm_head": True}
TOPK = {"attn.decode_pattern": "block_topk", "attn.block_size": 16, "attn.topk_blocks": 2,
        "attn.decode_window": 32, "attn.sinks": 4}
CONFIGS = {"fp16": None, "int4": INT4, "fp16_topk": TOPK}
DECODE_DYNAMIC = {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}
TARGET_FOR_ARCH = {"sm_80": "a100", "sm_89": "l40s", "sm_90": "h100"}


def _inputs(model: Llama, device, batch: int = BATCH, past: int = PAST) -> tuple:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, past, cfg.head_dim)
    dtype = next(model.parameters()).dtype
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return tuple(t.to(device) for t in (tokens, k, v))


def build_and_load(variant: str, arch: str, out_dir: str, device: str = "cuda"):
    """(loaded artifact, reference CompiledModel, JIT Triton CompiledModel, eager module, inputs, index)."""
    import json

    import lmforge

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Llama(LlamaConfig.preset(PRESET)).eval().half()
    step = LlamaDecodeStep(model)
    config = CONFIGS[variant]
    example = _inputs(model, "cpu", batch=2, past=8)  # torch.export specialises dims of size 1
    compiled = lmforge.compile(step, example, dynamic=DECODE_DYNAMIC, config=config, backends=("triton", "torch"))
    target = TARGET_FOR_ARCH[arch]
    compiled.add_gpu_kernels([target], backends=("triton",))
    path = compiled.export(f"{out_dir}/{variant}")
    index = json.loads((path / f"kernels/{target}/triton/index.json").read_text())
    loaded = lmforge.load(path, device=device, kernels="required" if device == "cuda" else "auto")
    reference = lmforge.load(path, device=device, kernels="none")
    jit = compiled.to(device)
    return loaded, reference, jit, step.to(device), _inputs(model, device), index


def _logits(fn, inputs):
    """A zero-argument call returning the logits of fn(*inputs), without autograd."""
    def run():
        with torch.no_grad():
            return fn(*inputs)[0]

    return run


def cases(quick: bool) -> list[Pending]:
    """One entry per variant (fp16, int4, block top-k), each compiled, exported and loaded when gpu_check reaches
    it; a variant that fails to build becomes one error row, the others still run."""
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    if arch not in TARGET_FOR_ARCH:
        raise RuntimeError(f"no lmforge GPU target for {arch}; AOT builds support {sorted(TARGET_FOR_ARCH)}")
    tmp = tempfile.mkdtemp(prefix="lmforge-artifact-")
    return [Pending(f"artifact/{PRESET}_{variant}_{arch}", lambda variant=variant: _variant_cases(variant, arch, tmp))
            for variant in CONFIGS]


def _variant_cases(variant: str, arch: str, tmp: str) -> list[dict]:
    """The rows of one exported variant: its cubins against the JIT backend and (not for block top-k) eager."""
    out = []
    loaded, reference, jit, eager, inputs, index = build_and_load(variant, arch, tmp)
    cubin = next(b for b in loaded.backends if b.name == "triton-cubin")
    served = sum(k.backend == "triton-cubin" for k in loaded.kernels)
    attention = sum(e["op"] in ATTENTION_OPS for e in index["nodes"])
    run = _logits(loaded, inputs)
    run()
    note = (f"{len(index['kernels'])} cubins serve {served} nodes, {attention} of them attention "
            f"({len(index['not_served'])} claimed nodes stay with the reference); fallbacks after the first "
            f"call: {sum(cubin.fallbacks.values())} {dict(cubin.fallbacks) or ''}").strip()
    common = {"kernel": run, "reference": _logits(reference, inputs), "rtol": 2e-2, "atol": 2e-2,
              "bytes": sum(w.numel() * w.element_size() for w in loaded.weights.values()), "flops": 0,
              "note": note}
    name = f"artifact/{PRESET}_{variant}_decode_b{BATCH}_past{PAST}_{arch}"
    out.append({**common, "name": f"{name}_vs_jit", "baseline": _logits(jit, inputs),
                "baseline_name": "JIT Triton backend"})
    if variant != "fp16_topk":
        out.append({**common, "name": f"{name}_vs_eager", "baseline": _logits(eager, inputs),
                    "baseline_name": "torch eager"})
    return out
