"""Hardware presets from vendor datasheets, and the target registry (`get_target`, `targets`).

Conventions for every number below:
- Peaks are dense (NVIDIA datasheets print 2:4-sparse tensor-core figures marked "*"; those are halved
  here). float32 is the non-tensor FP32 peak (what torch uses for fp32 matmul unless TF32 is enabled).
- Memory capacity is what the device itself reports (nvidia-smi `memory.total`, in MiB), not the datasheet's
  "GB": `fits` compares a graph's peak with it, and the usable memory is what the driver exposes. Most cards
  report less than the datasheet's "GB" read as GiB (an "80GB" H100 shows 81559 MiB, not 81920; an L40S with
  ECC on shows 46068 MiB, not 49152); each preset cites the report it uses.
- Bandwidths are decimal (1 TB/s = 1e12 B/s). Links are per direction: datasheets give NVLink and PCIe as
  bidirectional totals ("NVLink 900GB/s", "PCIe Gen5 128GB/s"), halved here.
- SM resources come from the CUDA C++ Programming Guide, "Technical Specifications per Compute
  Capability" table (https://docs.nvidia.com/cuda/cuda-c-programming-guide/#features-and-technical-specifications):
  65536 32-bit registers per SM for all of these; shared memory per SM / max per block: cc 8.0 164/163 KiB,
  cc 8.9 100/99 KiB, cc 9.0 and 10.0 228/227 KiB.
- Launch overhead (4 us) is not a datasheet number: it is the usual cost of launching one CUDA kernel from
  eager PyTorch; calibration on the device replaces it.
"""
from __future__ import annotations

import re

from lmforge.errors import TargetError
from lmforge.hwmodels.hardware import Hardware

KiB, MiB = 1024, 2**20
MB = 2**20  # cache sizes in datasheets/whitepapers are binary megabytes
T, G = 1e12, 1e9

_SMEM = {"sm_80": (164 * KiB, 163 * KiB), "sm_89": (100 * KiB, 99 * KiB),
         "sm_90": (228 * KiB, 227 * KiB), "sm_100": (228 * KiB, 227 * KiB)}
_LAUNCH_S = 4e-6
# Fixed cost of one collective (all-reduce / all-gather of a small message between the GPUs of one node):
# the order of magnitude NCCL's tests show on NVLink machines; not calibrated (no multi-GPU machine here).
_COLLECTIVE_S = 10e-6
_PCIE4 = ("PCIe Gen4 x16", 32 * G)   # "PCIe Gen4: 64GB/s" bidirectional
_PCIE5 = ("PCIe Gen5 x16", 64 * G)   # "PCIe Gen5: 128GB/s" bidirectional


def _gpu(name, arch, *, fp32, tf32, fp16, bf16, fp8, int8, mem_mib, bw, l2_mb, sms, interconnect, host_link=_PCIE5,
         notes=""):
    """A GPU preset; peaks in TFLOP/s (dense), bandwidth in TB/s, L2 in MB, memory in MiB as the device reports."""
    smem, smem_block = _SMEM[arch]
    return Hardware(
        name=name, arch=arch, kind="gpu",
        peak_flops={"float32": fp32 * T, "tfloat32": tf32 * T, "float16": fp16 * T, "bfloat16": bf16 * T,
                    "float8_e4m3fn": fp8 * T, "int8": int8 * T},
        memory_bytes=mem_mib * MiB, memory_bandwidth=bw * T, l2_bytes=l2_mb * MB, sm_count=sms,
        smem_per_sm=smem, regs_per_sm=65536, max_smem_per_block=smem_block,
        interconnect=interconnect, host_link=host_link, launch_overhead_s=_LAUNCH_S,
        launch_by_class={"collective": _COLLECTIVE_S}, notes=notes)


_AMPERE_NO_FP8 = ("no FP8 tensor cores: float8/int8 peaks are the FP16 / INT8 tensor rates "
                  "(FP8 weights run upcast to FP16)")

PRESETS: tuple[Hardware, ...] = (
    # NVIDIA A100 Tensor Core GPU datasheet, nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    # (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
    #  nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf),
    # table "NVIDIA A100 Tensor Core GPU Specifications", A100 40GB SXM column: FP32 19.5 TF, TF32 156 TF,
    # BF16/FP16 312 TF, INT8 624 TOPS (dense), 40GB HBM2 at 1,555GB/s, NVLink 600GB/s, PCIe Gen4 64GB/s.
    # SMs and L2: NVIDIA A100 Tensor Core GPU Architecture whitepaper, Table 1 (108 SMs, 40 MB L2).
    # Memory: nvidia-smi reports 40960 MiB (A100-SXM4-40GB) and 81920 MiB (A100-SXM4-80GB).
    _gpu("A100-40GB-SXM", "sm_80", fp32=19.5, tf32=156, fp16=312, bf16=312, fp8=312, int8=624, mem_mib=40960,
         bw=1.555, l2_mb=40, sms=108, interconnect=("NVLink 3", 300 * G), host_link=_PCIE4, notes=_AMPERE_NO_FP8),
    # Same datasheet and table, A100 80GB SXM column: same peaks, 80GB HBM2e at 2,039GB/s.
    _gpu("A100-80GB-SXM", "sm_80", fp32=19.5, tf32=156, fp16=312, bf16=312, fp8=312, int8=624, mem_mib=81920,
         bw=2.039, l2_mb=40, sms=108, interconnect=("NVLink 3", 300 * G), host_link=_PCIE4, notes=_AMPERE_NO_FP8),
    # NVIDIA H100 Tensor Core GPU datasheet
    # (https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet), table "Technical
    # Specifications", H100 SXM column: FP32 67 TF, TF32 989 TF*, BF16/FP16 1,979 TF*, FP8 3,958 TF*,
    # INT8 3,958 TOPS* (* = with sparsity, halved here), 80GB HBM3 at 3.35TB/s,
    # NVLink 900GB/s, PCIe Gen5 128GB/s. SMs and L2: NVIDIA H100 Tensor Core GPU Architecture whitepaper
    # (gtc22-whitepaper-hopper), Table 3: H100 SXM5 132 SMs, 50 MB L2.
    # Memory: nvidia-smi "NVIDIA H100 80GB HBM3 ... 0MiB / 81559MiB" (NVIDIA/nccl#1264).
    _gpu("H100-SXM", "sm_90", fp32=67, tf32=494.5, fp16=989.5, bf16=989.5, fp8=1979, int8=1979, mem_mib=81559,
         bw=3.35, l2_mb=50, sms=132, interconnect=("NVLink 4", 450 * G)),
    # Same datasheet (2022 edition, H100 PCIe column): FP32 51 TF, TF32 756 TF*, BF16/FP16 1,513 TF*,
    # FP8 3,026 TF*, INT8 3,026 TOPS*, 80GB HBM2e at 2TB/s, NVLink bridge 600GB/s, PCIe Gen5 128GB/s.
    # Hopper whitepaper Table 3: H100 PCIe 114 SMs, 50 MB L2. Memory: taken as the SXM card's 81559 MiB (same
    # 80 GB of HBM; no PCIe report checked here).
    _gpu("H100-PCIe", "sm_90", fp32=51, tf32=378, fp16=756.5, bf16=756.5, fp8=1513, int8=1513, mem_mib=81559,
         bw=2.0, l2_mb=50, sms=114, interconnect=("NVLink bridge", 300 * G)),
    # NVIDIA H200 Tensor Core GPU datasheet / product page (https://www.nvidia.com/en-us/data-center/h200/),
    # table "Technical Specifications", H200 SXM column: FP32 67 TF, TF32 989 TF*, BF16/FP16 1,979 TF*,
    # FP8 3,958 TF*, INT8 3,958 TOPS*, 141GB HBM3e at 4.8TB/s, NVLink 900GB/s, PCIe Gen5 128GB/s.
    # Same GH100 die as H100 SXM: 132 SMs, 50 MB L2 (Hopper whitepaper, Table 3).
    # Memory: nvidia-smi "NVIDIA H200 ... / 143771MiB".
    _gpu("H200-SXM", "sm_90", fp32=67, tf32=494.5, fp16=989.5, bf16=989.5, fp8=1979, int8=1979, mem_mib=143771,
         bw=4.8, l2_mb=50, sms=132, interconnect=("NVLink 4", 450 * G)),
    # NVIDIA HGX platform page (https://www.nvidia.com/en-us/data-center/hgx/), "HGX B200" column (8 GPUs,
    # sparse tensor figures): FP32 600 TF, TF32 18 PF*, FP16/BF16 36 PF*, FP8 72 PF*, INT8 72 POPS*,
    # per GPU = /8 and dense = /2 more; NVLink 5 1.8TB/s per GPU. DGX B200 datasheet: 1,440GB HBM3e and
    # 64TB/s for 8 GPUs (180GB, 8TB/s each). SM count (148) and L2 (126 MB) are not in NVIDIA's datasheets:
    # they come from CUDA device queries reported publicly; treat them as approximate.
    # Memory: nvidia-smi "NVIDIA B200 ... / 183359MiB" (NVIDIA/TensorRT-LLM#10278).
    _gpu("B200", "sm_100", fp32=75, tf32=1125, fp16=2250, bf16=2250, fp8=4500, int8=4500, mem_mib=183359,
         bw=8.0, l2_mb=126, sms=148, interconnect=("NVLink 5", 900 * G),
         notes="SM count and L2 size from public device queries, not a datasheet"),
    # NVIDIA L40S datasheet (https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413), table
    # "L40S Specifications": FP32 91.6 TF, TF32 183 TF (366*), BF16/FP16 362.05 TF (733*), FP8 733 TF (1,466*),
    # INT8 733 TOPS (1,466*), 48GB GDDR6 at 864GB/s, PCIe Gen4 x16 64GB/s, no NVLink; 142 RT cores = 142 SMs.
    # L2: 96 MB, the AD102 figure of the NVIDIA Ada GPU Architecture whitepaper (the datasheet omits it).
    # Memory: nvidia-smi "NVIDIA L40S, ..., 46068 MiB" with ECC on (akash-network/provider-configs#99).
    _gpu("L40S", "sm_89", fp32=91.6, tf32=183, fp16=362.05, bf16=362.05, fp8=733, int8=733, mem_mib=46068,
         bw=0.864, l2_mb=96, sms=142, interconnect=_PCIE4, host_link=_PCIE4,
         notes="L2 size from the AD102 whitepaper figure, not the L40S datasheet"),
    # NVIDIA L4 Tensor Core GPU datasheet (https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet),
    # table "Specifications": FP32 30.3 TF, TF32 120 TF*, BF16/FP16 242 TF*, FP8 485 TF*, INT8 485 TOPS*,
    # 24GB GDDR6 at 300GB/s, PCIe Gen4 x16 64GB/s. 58 SMs and 48 MB L2 (AD104): Ada whitepaper.
    # Memory: nvidia-smi "NVIDIA L4 ... / 23034MiB".
    _gpu("L4", "sm_89", fp32=30.3, tf32=60, fp16=121, bf16=121, fp8=242.5, int8=242.5, mem_mib=23034,
         bw=0.300, l2_mb=48, sms=58, interconnect=_PCIE4, host_link=_PCIE4),
    # NVIDIA Ada GPU Architecture whitepaper (nvidia-ada-gpu-architecture.pdf), Appendix A, table
    # "GeForce RTX 4090": 128 SMs, 72 MB L2, FP32 82.6 TF, TF32 82.6 TF, FP16/BF16 tensor with FP32 accumulate
    # 165.2 TF (what framework GEMMs use; FP16-accumulate is 330.3), FP8 with FP32 accumulate 330.3 TF,
    # INT8 660.6 TOPS, 24GB GDDR6X at 1,008GB/s; PCIe Gen4 x16, no NVLink.
    # Memory: nvidia-smi "NVIDIA GeForce RTX 4090 ... / 24564MiB" (RLinf/RLinf#255).
    _gpu("RTX-4090", "sm_89", fp32=82.6, tf32=82.6, fp16=165.2, bf16=165.2, fp8=330.3, int8=660.6, mem_mib=24564,
         bw=1.008, l2_mb=72, sms=128, interconnect=_PCIE4, host_link=_PCIE4),
)

# Short names people type -> canonical preset name. Matching ignores case, spaces, '-' and '_'.
ALIASES = {
    "a100": "A100-80GB-SXM", "a100-80gb": "A100-80GB-SXM", "a100-sxm": "A100-80GB-SXM",
    "a100-40gb": "A100-40GB-SXM", "h100": "H100-SXM", "h100-sxm5": "H100-SXM", "h200": "H200-SXM",
    "4090": "RTX-4090", "rtx4090": "RTX-4090", "geforce-rtx-4090": "RTX-4090",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(hw.name): hw for hw in PRESETS}
_BY_KEY.update({_key(alias): _BY_KEY[_key(canon)] for alias, canon in ALIASES.items()})


def known_names() -> list[str]:
    return [hw.name for hw in PRESETS] + ["host"]


def get_target(name: "str | Hardware") -> Hardware:
    """The Hardware for a target name ("h100", "A100-40GB-SXM", "host", ...; case-insensitive).

    A Hardware passed in is validated (`Hardware.validate`: a missing peak, a unit mistake) and returned: a
    description without a float16 peak used to run fp16 at the fp32 CUDA-core peak without a word.
    "host" probes the CPU (cached, see `host.host_hardware`).
    """
    if isinstance(name, Hardware):
        return name.validate()
    key = _key(str(name))
    if key == "host":
        from lmforge.hwmodels.host import host_hardware

        return host_hardware()
    if key in _BY_KEY:
        return _BY_KEY[key]
    raise TargetError(f"unknown target {name!r}; known targets: {', '.join(known_names())} "
                      f"(aliases: {', '.join(sorted(ALIASES))}). `lmforge targets` lists them.")


# (tokens all in the CUDA device name, tokens none of which may be in it, preset); the first match wins. A token is a
# whole word of the upper-cased name split at anything but letters and digits, so "L40" is not "L4" and "GH200" is
# not "H200". The exclusions keep variants whose memory, bandwidth, clocks or links differ off the preset of the card
# they are named after: H100 NVL (94 GB at 3.9 TB/s), H200 NVL (lower power and clocks), A100 PCIe (1.9 TB/s on the
# 80GB card, 250-300 W), H100 / A100 with other memory sizes (64, 94, 96 GB), RTX 4090 D (114 SMs), laptop parts,
# MIG slices. Such a card gets no preset rather than a wrong one.
_DEVICE_NAMES = (
    ({"H100", "PCIE"}, {"NVL"}, "H100-PCIe"),
    ({"H100"}, {"NVL", "PCIE", "64GB", "94GB", "96GB"}, "H100-SXM"),
    ({"H200"}, {"NVL", "PCIE"}, "H200-SXM"),
    ({"B200"}, set(), "B200"),
    ({"A100", "40GB"}, {"PCIE"}, "A100-40GB-SXM"),
    ({"A100", "80GB"}, {"PCIE"}, "A100-80GB-SXM"),
    ({"L40S"}, set(), "L40S"),
    ({"L4"}, set(), "L4"),
    ({"4090"}, {"D", "LAPTOP"}, "RTX-4090"),
)


def target_for_device_name(device_name: str) -> Hardware:
    """The preset of a CUDA device name as torch reports it ("NVIDIA H100 80GB HBM3" -> H100-SXM).

    Only the card a preset describes matches: "NVIDIA L40", "NVIDIA GH200 480GB", "NVIDIA H100 NVL" or "NVIDIA A100
    80GB PCIe" raise TargetError instead of borrowing the numbers (and the calibration file) of another card.
    """
    tokens = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    if "MIG" in tokens:   # a MIG slice has a fraction of the card's memory and SMs
        raise TargetError(f"the GPU {device_name!r} is a MIG slice, which no preset describes (its memory and SMs are "
                          "a fraction of the card's); describe it as a Hardware (see lmforge.hwmodels.presets)")
    for required, excluded, preset in _DEVICE_NAMES:
        if required <= tokens and not excluded & tokens:
            return get_target(preset)
    near = sorted({preset for required, _, preset in _DEVICE_NAMES if required <= tokens})
    variant = f" (a variant of {' / '.join(near)} with other memory, bandwidth or links)" if near else ""
    raise TargetError(f"no preset matches the GPU {device_name!r}{variant}; known targets: {', '.join(known_names())}. "
                      f"Describe it as a Hardware (see lmforge.hwmodels.presets) to use it.")


def targets(include_host: bool = True) -> list[Hardware]:
    """Every preset, and the host CPU (probed once, then cached) unless include_host is False."""
    out = list(PRESETS)
    if include_host:
        from lmforge.hwmodels.host import host_hardware

        out.append(host_hardware())
    return out
