"""Artifact export and load: round trip through a fresh process, manifest contents, targets, kernel files,
graphs with no ONNX form, atomic writes and refusing to overwrite what is not an artifact."""
import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.artifact import inspect_artifact, load
from lmforge.errors import ArtifactError, TargetError
from lmforge.exporting import export, export_workload

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: forbids every unpickling entry point, loads the artifacts, runs them.
CHILD = textwrap.dedent("""
    import pickle, sys, torch
    def forbidden(*a, **k):
        raise AssertionError("artifact loading must never unpickle")
    torch.load = pickle.load = pickle.loads = forbidden
    from safetensors.torch import load_file, save_file
    import lmforge.artifact
    out = {}
    for name in sys.argv[2:]:
        model = lmforge.artifact.load(f"{sys.argv[1]}/{name}")
        inputs = load_file(f"{sys.argv[1]}/{name}-inputs.safetensors")
        results = model(*[inputs[str(i)] for i in range(len(inputs))])
        out.update({f"{name}.{i}": r.contiguous() for i, r in enumerate(results)})
    save_file(out, f"{sys.argv[1]}/outputs.safetensors")
""")


def round_trip_in_child(tmp_path, cases: dict) -> dict:
    """Export each {name: (compiled, inputs, ...)} case, load and run it in a fresh interpreter (CHILD);
    returns the child's outputs keyed "<name>.<i>"."""
    for name, (compiled, inputs, *_) in cases.items():
        export(compiled, tmp_path / name)
        save_file({str(i): x for i, x in enumerate(inputs)}, str(tmp_path / f"{name}-inputs.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), *cases], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(tmp_path / "outputs.safetensors"))


def test_round_trip_in_a_fresh_process_gives_identical_outputs(
        tmp_path, llama, prefill_compiled, decode_compiled, make_tokens, make_decode_inputs):
    cases = {"prefill": (prefill_compiled, (make_tokens(3, 7, seed=5),), llama.prefill),
             "decode": (decode_compiled, make_decode_inputs(2, 6, seed=9), llama.decode_step)}
    outputs = round_trip_in_child(tmp_path, cases)
    for name, (compiled, inputs, eager) in cases.items():
        with torch.no_grad():
            before, reference = compiled(*inputs), eager(*inputs)
        for i, (b, r) in enumerate(zip(before, reference)):
            assert torch.equal(outputs[f"{name}.{i}"], b), f"{name} output {i} changed through export/load"
            assert ((b - r).norm() / r.norm()).item() <= 1e-5


def test_manifest_lists_versions_targets_types_and_every_file(tmp_path, prefill_compiled):
    path = export(prefill_compiled, tmp_path / "art", objectives={"predicted": {"latency_s": 1e-3}, "measured": {}})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["format"] == "lmforge-artifact"
    assert manifest["name"] == "LlamaPrefill" and manifest["graph_hash"] == prefill_compiled.graph.signature()
    assert datetime.fromisoformat(manifest["created"]).utcoffset().total_seconds() == 0
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["lmforge"] == lmforge.__version__
    assert set(manifest["versions"]) == {"lmforge", "torch", "triton", "tvm", "onnx"}
    assert manifest["targets"] == [{"name": "host", "kind": "cpu", "fingerprint": None}]
    assert manifest["objectives"] == {"predicted": {"latency_s": 1e-3}, "measured": {}}
    assert manifest["inputs"] == [{"name": "tokens", "type": {"shape": ["batch", "seq"], "dtype": "int64"}}]
    assert [o["type"]["shape"] for o in manifest["outputs"]][0] == ["batch", "seq", 37]
    assert manifest["onnx"]["written"] is True
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk == {"graph.json", "weights.safetensors", "model.onnx", "README.md"}
    for rel, entry in manifest["files"].items():
        data = (path / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    readme = (path / "README.md").read_text()
    assert "`tokens` | int64[batch, seq]" in readme and "lmforge.load" in readme
    assert "Kernels: none; `load` runs every node with the torch reference" in readme
    assert inspect_artifact(path)["graph_hash"] == manifest["graph_hash"]


def test_gpu_targets_and_kernel_files(tmp_path, prefill_compiled, make_tokens):
    from lmforge.hwmodels import get_target

    compiled = lmforge.compile(prefill_compiled.graph, target="h100")
    compiled.kernel_files = {"h100": {"attention/kernel.ptx": b"// ptx", "meta.json": b"{}"}}
    path = export(compiled, tmp_path / "gpu", targets=["a100"])
    manifest = json.loads((path / "manifest.json").read_text())
    by_name = {t["name"]: t for t in manifest["targets"]}
    assert set(by_name) == {"host", "h100", "a100"} and manifest["target"] == "h100"
    assert by_name["h100"] == {"name": "h100", "kind": "gpu", "fingerprint": get_target("h100").fingerprint()}
    assert (path / "kernels/h100/attention/kernel.ptx").read_bytes() == b"// ptx"
    assert "kernels/h100/meta.json" in manifest["files"]
    loaded = load(path, target="a100")
    assert loaded.target == "a100" and loaded.device.type == "cpu"
    tokens = make_tokens(1, 4, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(loaded(tokens), compiled(tokens)))
    if not torch.cuda.is_available():
        with pytest.raises(TargetError, match="no CUDA device"):
            load(path, device="cuda")


@pytest.mark.parametrize("rel", ["../escape.ptx", "/abs/kernel.ptx", "a/../../b", "a\\b"])
def test_kernel_files_that_escape_their_folder_are_refused(tmp_path, prefill_compiled, rel):
    compiled = lmforge.compile(prefill_compiled.graph)
    compiled.kernel_files = {"host": {rel: b"x"}}
    with pytest.raises(ArtifactError):
        export(compiled, tmp_path / "art")
    assert not any(tmp_path.iterdir()), "a refused export writes nothing"


def test_a_graph_with_no_onnx_form_is_exported_without_model_onnx(tmp_path):
    def fn(x):
        return torch.cumsum(x, dim=1) * 2

    x = torch.randn(2, 6)
    compiled = lmforge.compile(fn, (x,))
    path = export(compiled, tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["onnx"]["written"] is False and "aten.cumsum" in manifest["onnx"]["reason"]
    assert not (path / "model.onnx").exists() and "model.onnx" not in manifest["files"]
    assert "no `model.onnx`" in (path / "README.md").read_text()
    assert torch.equal(load(path)(x), compiled(x)) and [n.op for n in load(path).graph.nodes] == [
        n.op for n in compiled.graph.nodes]


class _BrokenOnnx(types.ModuleType):
    def __getattr__(self, name):   # what a protobuf version mismatch raises when onnx is imported
        raise TypeError("Descriptors cannot be created directly")


@pytest.mark.parametrize("broken", [None, _BrokenOnnx("onnx_export")], ids=["missing", "broken"])
def test_a_machine_without_onnx_exports_without_model_onnx(tmp_path, monkeypatch, broken):
    """A GPU machine with torch only (no onnx), or a broken onnx install: the artifact is written without
    model.onnx, with the reason."""
    monkeypatch.setitem(sys.modules, "lmforge.backends.onnx_export", broken)   # None: importing raises ImportError
    x = torch.randn(2, 6)
    compiled = lmforge.compile(lambda x: torch.relu(x) * 2, (x,))
    with pytest.warns(UserWarning, match="onnx cannot be imported"):
        path = export(compiled, tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["onnx"]["written"] is False and "onnx cannot be imported" in manifest["onnx"]["reason"]
    assert not (path / "model.onnx").exists()
    assert torch.equal(load(path)(x), compiled(x))


def test_export_refuses_to_overwrite_what_is_not_an_artifact(tmp_path, prefill_compiled):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not an lmforge artifact"):
        export(prefill_compiled, precious)
    assert (precious / "notes.txt").read_text() == "keep me" and len(list(precious.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        export(prefill_compiled, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert inspect_artifact(export(prefill_compiled, tmp_path / "empty"))["name"] == "LlamaPrefill"


def test_export_replaces_an_artifact_and_a_crash_leaves_the_old_one(tmp_path, prefill_compiled, monkeypatch):
    # the module, even once `lmforge.exporting` (the attribute) is the export function
    export_module = importlib.import_module("lmforge.exporting")

    path = export(lmforge.compile(lambda x: x * 2, (torch.randn(3),)), tmp_path / "art")
    first = json.loads((path / "manifest.json").read_text())
    export(prefill_compiled, path)
    assert json.loads((path / "manifest.json").read_text())["name"] == "LlamaPrefill" != first["name"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(export_module, "_readme", crash)
    with pytest.raises(KeyboardInterrupt):
        export(lmforge.compile(lambda x: x + 1, (torch.randn(3),)), path)
    assert inspect_artifact(path)["name"] == "LlamaPrefill"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"], "no temporary directories are left behind"


def test_export_method_and_export_workload(tmp_path):
    workload = tmp_path / "wl.py"
    workload.write_text(textwrap.dedent("""
        import torch
        from lmforge.workload import Workload

        def workload():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).eval()
            return Workload(model=model, example_inputs=(torch.randn(2, 4),), dynamic={"input": {0: "batch"}},
                            name="mlp")
    """))
    path = export_workload(str(workload), "host", tmp_path / "out")
    model = load(path)
    x = torch.randn(5, 4)
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).eval()
    assert ((model(x) - eager(x)).norm() / eager(x).norm()).item() <= 1e-6
    assert model.export(tmp_path / "again") == tmp_path / "again" and load(tmp_path / "again")(x).shape == (5, 3)
    import lmforge   # the public function, not the module lmforge.exporting

    assert lmforge.export(model, tmp_path / "third") == tmp_path / "third"
    assert torch.equal(load(tmp_path / "third")(x), model(x))
