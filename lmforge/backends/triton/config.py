"""A kernel configuration: tile sizes and other constexpr parameters, warps per program, pipeline stages.

A frozen value that serializes to JSON (for the tuning database and artifacts) and hashes (for caches).

    cfg = KernelConfig.make(num_warps=4, num_stages=2, BLOCK_M=64, BLOCK_N=64)
    cfg.get("BLOCK_M")  # 64
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class KernelConfig:
    params: tuple[tuple[str, int], ...] = ()
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def make(num_warps: int = 4, num_stages: int = 2, **params: int) -> "KernelConfig":
        return KernelConfig(tuple(sorted((k, int(v)) for k, v in params.items())), int(num_warps), int(num_stages))

    def get(self, name: str, default: Any = None) -> Any:
        for k, v in self.params:
            if k == name:
                return v
        if default is None:
            raise KeyError(f"kernel config has no parameter {name!r} (it has {[k for k, _ in self.params]})")
        return default

    def require(self, name: str, kernel: str) -> int:
        """A parameter a kernel cannot run without; a clear error names the kernel and where to start from."""
        for k, v in self.params:
            if k == name and v is not None:
                return int(v)
        from lmforge.errors import LmforgeError

        raise LmforgeError(f"{kernel} config {self.to_dict()} lacks {name!r}; start from "
                           f"DEFAULT_CONFIGS[{kernel!r}] or one of CANDIDATE_CONFIGS[{kernel!r}].")

    def with_(self, **changes: int) -> "KernelConfig":
        params = dict(self.params)
        warps = changes.pop("num_warps", self.num_warps)
        stages = changes.pop("num_stages", self.num_stages)
        params.update(changes)
        return KernelConfig.make(warps, stages, **params)

    def to_dict(self) -> dict[str, Any]:
        return {"params": dict(self.params), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "KernelConfig":
        return KernelConfig.make(d.get("num_warps", 4), d.get("num_stages", 2), **dict(d.get("params", {})))

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"KernelConfig({inner}, num_warps={self.num_warps}, num_stages={self.num_stages})"
