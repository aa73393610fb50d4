"""GPU kernels generated without a GPU travel in the artifact under kernels/<target>/ and are hash-checked."""
import json

import pytest

import lmforge
from examples.models.llama import LlamaDecodeStep
from lmforge.artifact import inspect_artifact
from lmforge.errors import ArtifactError, LmforgeError
from lmforge.exporting import export

pytest.importorskip("tvm")


def test_cuda_kernels_are_exported_and_verified(tmp_path, llama, make_decode_inputs):
    dynamic = {"tokens": {0: "batch"}, "k_cache": {1: "batch", 3: "past"}, "v_cache": {1: "batch", 3: "past"}}
    compiled = lmforge.compile(LlamaDecodeStep(llama), make_decode_inputs(2, 4, 0), dynamic=dynamic, target="h100")
    added = compiled.add_gpu_kernels(["h100"])
    assert "kernels.json" in added["h100"] and any(f.endswith(".cu") for f in added["h100"])
    path = export(compiled, tmp_path / "art")
    manifest = inspect_artifact(path)
    cu = [f for f in manifest["files"] if f.startswith("kernels/h100/tvm-cuda/") and f.endswith(".cu")]
    assert cu and "__global__" in (path / cu[0]).read_text()
    index = json.loads((path / "kernels/h100/tvm-cuda/kernels.json").read_text())
    assert index["arch"] == "sm_90"
    (path / cu[0]).write_text("tampered")
    with pytest.raises(ArtifactError):
        inspect_artifact(path)


def test_gpu_kernels_need_a_gpu_target(llama, make_decode_inputs):
    compiled = lmforge.compile(LlamaDecodeStep(llama), make_decode_inputs(2, 4, 0))
    with pytest.raises(LmforgeError, match="not a CUDA GPU"):
        compiled.add_gpu_kernels(["host"])
