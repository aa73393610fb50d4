"""The TVM backend's host kernels in an artifact (kernels/host/tvm/): exported as shared libraries, loaded back on
the CPU in a fresh process with the same outputs, skipped with a warning (or an error when required) when they do
not fit the machine, and never loaded before their sha256 was checked."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.artifact import load
from lmforge.backends.tvm import host_library
from lmforge.errors import ArtifactError, LmforgeError
from lmforge.exporting import export

REPO = Path(__file__).resolve().parents[2]
HOST_DIR = "kernels/host/tvm"

# Runs in a fresh interpreter with unpickling forbidden: loads the artifact, runs it on each input, reports which
# backend ran each node and how many builds came from the library.
CHILD = textwrap.dedent("""
    import json, pickle, sys, torch
    def forbidden(*a, **k):
        raise AssertionError("artifact loading must never unpickle")
    torch.load = pickle.load = pickle.loads = forbidden
    from safetensors.torch import load_file, save_file
    import lmforge
    root = sys.argv[1]
    model = lmforge.load(f"{root}/art", kernels="required")
    inputs = load_file(f"{root}/inputs.safetensors")
    save_file({k: model(x).contiguous() for k, x in inputs.items()}, f"{root}/outputs.safetensors")
    stats = next(k.fn.cache.stats for k in model.kernels if k.backend == "tvm")
    json.dump({"backends": [k.backend for k in model.kernels], "details": [k.detail for k in model.kernels],
               "source": model.kernel_source, "from_library": stats.from_library, "builds": stats.builds},
              open(f"{root}/report.json", "w"))
""")


class Block(torch.nn.Module):
    """linear -> rmsnorm -> silu-gated linear -> softmax: a few distinct TVM kernels, cheap to build."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.norm = torch.nn.RMSNorm(32, eps=1e-6)
        self.gate = torch.nn.Linear(32, 32, bias=False)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(self.up(x))
        return torch.softmax(self.down(torch.nn.functional.silu(self.gate(h)) * h), dim=-1)


def inputs(rows, seed):
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = Block().eval()
    compiled = lmforge.compile(model, (inputs(3, 0),), dynamic={"x": {0: "rows"}}, backends=("tvm",))
    compiled(inputs(3, 0))   # builds the 3-row kernels; export adds each kernel's main build
    return compiled


@pytest.fixture(scope="module")
def artifact(compiled, tmp_path_factory):
    return export(compiled, tmp_path_factory.mktemp("host-tvm") / "art")


def tvm_nodes(model) -> int:
    return sum(k.backend == "tvm" for k in model.kernels)


def test_export_writes_one_library_per_build_an_index_and_a_host_fingerprint(compiled, artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    host = next(t for t in manifest["targets"] if t["name"] == "host")
    index = json.loads((artifact / HOST_DIR / "index.json").read_text())
    assert host["fingerprint"] == host_library.fingerprint(index)
    libraries = sorted(rel for rel in manifest["files"] if rel.startswith(HOST_DIR) and rel.endswith(".so"))
    assert libraries and [f"{HOST_DIR}/{name}" for name in sorted(index["libraries"])] == libraries
    import platform

    import tvm

    assert index["machine"] == platform.machine() and index["tvm_version"] == tvm.__version__
    assert index["target"]["kind"] == "llvm" and index["features"] and index["target_string"]
    tvm_labels = {n.outputs[0].name for n, k in zip(compiled.graph.nodes, compiled.kernels) if k.backend == "tvm"}
    assert set(index["nodes"]) == tvm_labels
    for entry in index["libraries"].values():   # what a loader needs to call it: arguments in order, by role,
        # and what it computes (the structural hash of its PrimFunc)
        assert entry["function"] == "main" and entry["signature"]["inputs"] and entry["signature"]["outputs"]
        assert entry["signature"]["structure"].isdigit()
    linear = index["nodes"][compiled.graph.nodes[0].outputs[0].name]
    assert {json.dumps(b["variant"]) for b in linear["builds"]} >= {"[3]", '"gemm"'}   # called shape + main build
    readme = (artifact / "README.md").read_text()
    assert f"Kernels (`kernels/<target>/`): host: {len(libraries)} TVM host libraries." in readme


def test_loaded_in_a_fresh_process_runs_the_library_with_the_same_outputs(compiled, artifact, tmp_path):
    shutil.copytree(artifact, tmp_path / "art")
    cases = {"called": inputs(3, 1), "gemm": inputs(37, 2), "new_small": inputs(5, 3)}
    save_file(cases, str(tmp_path / "inputs.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backends"] == [k.backend for k in compiled.kernels] and "tvm" in report["backends"]
    assert all("host library" in d for b, d in zip(report["backends"], report["details"]) if b == "tvm")
    assert report["source"] == HOST_DIR and report["from_library"] > 0
    assert report["builds"] > 0   # the 5-row gemv was never called before export: built on first use
    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    for name, x in cases.items():
        torch.testing.assert_close(outputs[name], compiled(x), rtol=1e-6, atol=1e-7, msg=name)


def test_a_library_for_another_machine_falls_back_to_the_reference_with_a_warning(compiled, artifact,
                                                                                   monkeypatch):
    monkeypatch.setattr(host_library.platform, "machine", lambda: "riscv64")
    with pytest.warns(UserWarning, match="built for .* and this machine is riscv64.*torch reference runs instead"):
        model = load(artifact)
    assert tvm_nodes(model) == 0 and model.kernel_source is None
    x = inputs(4, 5)
    torch.testing.assert_close(model(x), compiled(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(LmforgeError, match="riscv64.*Export the artifact again on a machine of this kind"):
        load(artifact, kernels="required")


def test_missing_cpu_features_do_not_fit(artifact):
    index = json.loads((artifact / HOST_DIR / "index.json").read_text())
    assert host_library.library_mismatch(index) is None
    index["features"] = [*index["features"], "made-up-feature"]
    assert "made-up-feature" in host_library.library_mismatch(index)
    index["tvm_version"] = "0.1.0"
    assert "TVM 0.1.0" in host_library.library_mismatch(index)


def test_kernels_none_runs_the_reference_and_required_needs_a_library(compiled, artifact, tmp_path):
    assert tvm_nodes(load(artifact, kernels="none")) == 0
    assert tvm_nodes(load(artifact, kernels="required")) == tvm_nodes(compiled)
    plain = export(lmforge.compile(compiled.graph), tmp_path / "plain")
    assert not (plain / "kernels").exists()
    with pytest.raises(LmforgeError, match="has none.*backends=\\('tvm',\\)"):
        load(plain, kernels="required")


def test_a_tampered_library_is_refused_before_anything_loads_it(artifact, tmp_path, monkeypatch):
    import tvm

    def never(*a, **k):
        raise AssertionError("a library was loaded before its hash was checked")

    monkeypatch.setattr(tvm.runtime, "load_module", never)
    root = tmp_path / "art"
    shutil.copytree(artifact, root)
    lib = next((root / HOST_DIR).glob("*.so"))
    data = bytearray(lib.read_bytes())
    data[100] ^= 0x01
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{lib.name} does not match its sha256"):
        load(root)


def test_reexporting_a_loaded_model_carries_its_libraries(artifact, tmp_path):
    again = export(load(artifact), tmp_path / "again")

    def libraries(root):
        return sorted(lib.read_bytes() for lib in (root / HOST_DIR).glob("*.so"))

    assert libraries(again) == libraries(artifact)


def _edited(artifact, root, edit):
    """A copy of `artifact` at `root` whose host index is `edit(index)`'s, the manifest's hash fixed up (what a
    hash cannot catch: the index says something else than the export wrote)."""
    import hashlib

    shutil.copytree(artifact, root)
    path = root / HOST_DIR / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    data = json.dumps(index).encode()
    path.write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][f"{HOST_DIR}/index.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _first(mapping):
    return next(iter(mapping.values()))


@pytest.mark.parametrize("edit,message", [
    (lambda i: i["target"].update(kind="cuda"), "is not a host \\(llvm\\) target"),
    (lambda i: i["target"].update(mcpu="x86-64"), "was not built for the index's target"),
    (lambda i: _first(i["nodes"]).pop("op"), "op is NoneType, not str"),
    (lambda i: _first(i["nodes"])["builds"][0].pop("variant"), "has no variant"),
    (lambda i: i.update(features="avx2"), "features is str, not list"),
    (lambda i: _first(i["libraries"]).update(signature=[]), "signature is list, not dict"),
    (lambda i: _first(i["nodes"]).update(op="softmax"), "names a library of another op"),
], ids=["cuda target", "other mcpu", "node without op", "build without variant", "features not a list",
        "signature not a dict", "node op != library op"])
def test_an_inconsistent_index_is_refused_with_a_clear_error(artifact, tmp_path, edit, message):
    """Each was a crash inside TVM at the first call, a bare KeyError, a misleading message, or (a changed mcpu)
    a silent rebuild of every kernel that kernels='required' let pass."""
    root = _edited(artifact, tmp_path / "art", edit)
    for kernels in ("auto", "required"):
        with pytest.raises(ArtifactError, match=message):
            load(root, kernels=kernels)


def test_a_library_whose_recorded_computation_differs_is_built_again_not_called(compiled, artifact, tmp_path):
    """Two kernels of one argument list (cos and sin) differ only in what they compute: the index records each
    build's structural hash, and a library whose hash is not the kernel's lowering is rebuilt (a warning), never
    called in its place."""
    def edit(index):
        for lib in index["libraries"].values():
            lib["signature"]["structure"] = "0"

    root = _edited(artifact, tmp_path / "art", edit)
    with pytest.warns(UserWarning, match="building it again instead"):
        model = load(root)
        x = inputs(3, 1)
        out = model(x)
    torch.testing.assert_close(out, compiled(x), rtol=1e-6, atol=1e-7)
    assert next(k.fn.cache.stats for k in model.kernels if k.backend == "tvm").from_library == 0


def test_an_index_that_serves_no_node_and_a_dropped_library_on_reexport_are_said(artifact, tmp_path):
    def rename(index):
        index["nodes"] = {f"no-such-{label}": node for label, node in index["nodes"].items()}

    root = _edited(artifact, tmp_path / "art", rename)
    with pytest.raises(LmforgeError, match="serves no node of its graph"):
        load(root, kernels="required")
    with pytest.warns(UserWarning, match="serves no node of its graph"):
        assert tvm_nodes(load(root)) == 0
    with pytest.warns(UserWarning, match="loaded from an artifact with a TVM host library, but it ran no node"):
        export(load(artifact, kernels="none"), tmp_path / "again")
