"""A table of damaged or hostile artifacts: each is refused with an ArtifactError/TargetError whose message
says what to do, raised from lmforge code (the traceback's last frame is in lmforge) with the library
exception that noticed the problem suppressed (`raise ... from None`: no __cause__, context suppressed)."""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import lmforge
from lmforge.artifact import load
from lmforge.errors import ArtifactError, LmforgeError, TargetError
from lmforge.exporting import export

LMFORGE_DIR = Path(lmforge.__file__).resolve().parent
# every message tells the user what to do next
ADVICE = r"(export (it|the artifact) again|re-export|load it with|remove them|copy (it|the artifact) again|use 'cpu')"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    # the TVM backend runs the nodes, so the artifact carries host shared libraries (kernels/host/tvm/) too
    compiled = lmforge.compile(model, (torch.randn(3, 4),), dynamic={"input": {0: "batch"}}, backends=("tvm",))
    compiled(torch.randn(3, 4))
    return export(compiled, tmp_path_factory.mktemp("template") / "art")


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(fn):
    def apply(root):
        m = manifest_of(root)
        fn(m)
        write_manifest(root, m)

    return apply


def rehash(root: Path, rel: str) -> None:
    """Fix the manifest up after editing `rel`, as a tamperer would, so deeper checks are reached."""
    m = manifest_of(root)
    data = (root / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(root, m)


def flip_byte(rel: str, offset: int = -20):
    def apply(root):
        data = bytearray((root / rel).read_bytes())
        data[offset] ^= 0x01
        (root / rel).write_bytes(bytes(data))

    return apply


def host_index_naming_a_foreign_library(root):
    """The host library index names a .so the manifest does not list (the index's hash fixed up)."""
    rel = "kernels/host/tvm/index.json"
    index = json.loads((root / rel).read_text())
    index["libraries"]["99_linear.so"] = dict(next(iter(index["libraries"].values())))
    (root / rel).write_text(json.dumps(index))
    rehash(root, rel)


def truncate(root):
    path = root / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-16])


def same_size_graph_edit(root):
    path = root / "graph.json"
    text = path.read_text()
    path.write_text(text.replace('"relu"', '"tanh"', 1))  # same length, different graph


def graph_edit_with_fixed_hash(root):
    same_size_graph_edit(root)
    rehash(root, "graph.json")


def foreign_weights_with_fixed_hash(root):
    (root / "weights.safetensors").write_bytes(save({"something.else": torch.zeros(3)}))
    rehash(root, "weights.safetensors")


def junk_weights_with_fixed_hash(root):
    (root / "weights.safetensors").write_bytes(b"\xff" * 64)
    rehash(root, "weights.safetensors")


def junk_graph_with_fixed_hash(root):
    (root / "graph.json").write_text('{"schema": 1, "name": "x"')
    rehash(root, "graph.json")


def graph_json_of(text: str):
    def apply(root):
        (root / "graph.json").write_text(text)
        rehash(root, "graph.json")

    return apply


def symlink_out(root):
    outside = root.parent / "outside.txt"
    outside.write_text("secret")
    (root / "README.md").unlink()
    (root / "README.md").symlink_to(outside)


def list_directory(root):
    (root / "kernels").mkdir(exist_ok=True)   # the template has kernels/host/tvm/ already
    edit_manifest(lambda m: m["files"].__setitem__("kernels", {"sha256": "0" * 64, "bytes": 0}))(root)


def duplicate_key(root):
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text.replace('{', '{"name": "twice", ', 1))


def empty_directory(root):
    shutil.rmtree(root)
    root.mkdir()


# name -> (damage, load kwargs, expected error, message pattern)
CASES = {
    "missing manifest": (lambda r: (r / "manifest.json").unlink(), {}, ArtifactError, "manifest.json is missing"),
    "bad JSON": (lambda r: (r / "manifest.json").write_text("{nope"), {}, ArtifactError, "not valid JSON"),
    "manifest not an object": (lambda r: (r / "manifest.json").write_text("[1, 2]"), {}, ArtifactError,
                               "JSON object"),
    "duplicate key": (duplicate_key, {}, ArtifactError, "appears twice"),
    "wrong schema version": (edit_manifest(lambda m: m.update(schema_version=2)), {}, ArtifactError,
                             "schema_version 2"),
    "wrong format": (edit_manifest(lambda m: m.update(format="zip")), {}, ArtifactError, "not an lmforge artifact"),
    "missing key": (edit_manifest(lambda m: m.pop("graph_hash")), {}, ArtifactError, "missing key 'graph_hash'"),
    "wrong type": (edit_manifest(lambda m: m.update(targets="host")), {}, ArtifactError, "'targets' must be list"),
    "bool as size": (edit_manifest(lambda m: m["files"]["graph.json"].update(bytes=True)), {}, ArtifactError,
                     "'bytes' must be int"),
    "bad sha256 format": (edit_manifest(lambda m: m["files"]["graph.json"].update(sha256="XYZ")), {}, ArtifactError,
                          "lowercase hex sha256"),
    "weights not listed": (edit_manifest(lambda m: m["files"].pop("weights.safetensors")), {}, ArtifactError,
                           "does not list weights.safetensors"),
    "missing file": (lambda r: (r / "model.onnx").unlink(), {}, ArtifactError, "model.onnx is listed .* but missing"),
    "truncated weights": (truncate, {}, ArtifactError, "truncated"),
    "flipped byte in weights": (flip_byte("weights.safetensors"), {}, ArtifactError, "sha256"),
    # a shared library runs code when loaded: its hash is checked before anything loads it
    "tampered host library": (flip_byte("kernels/host/tvm/00_linear.so", 200), {}, ArtifactError,
                              "00_linear.so does not match its sha256"),
    "host index names a foreign library, hash fixed up": (host_index_naming_a_foreign_library, {}, ArtifactError,
                                                          "not a valid host kernel index"),
    "graph edited, same size": (same_size_graph_edit, {}, ArtifactError, "graph.json does not match its sha256"),
    "hash mismatch": (edit_manifest(lambda m: m["files"]["README.md"].update(sha256="a" * 64)), {}, ArtifactError,
                      "README.md does not match its sha256"),
    "graph edited, hash fixed up": (graph_edit_with_fixed_hash, {}, ArtifactError, "the graph was modified"),
    "graph not JSON, hash fixed up": (junk_graph_with_fixed_hash, {}, ArtifactError, "not a valid lmforge graph"),
    "graph a JSON list, hash fixed up": (graph_json_of("[]"), {}, ArtifactError, "not a valid lmforge graph"),
    "graph JSON null, hash fixed up": (graph_json_of("null"), {}, ArtifactError, "not a valid lmforge graph"),
    "graph nested too deep, hash fixed up": (graph_json_of("[" * 100000 + "]" * 100000), {}, ArtifactError,
                                             "not a valid lmforge graph"),
    "manifest nested too deep": (lambda r: (r / "manifest.json").write_text("[" * 100000 + "]" * 100000), {},
                                 ArtifactError, "not valid JSON"),
    "manifest inputs edited": (edit_manifest(lambda m: m["inputs"][0]["type"].update(dtype="int64")), {},
                               ArtifactError, "the manifest was modified"),
    "manifest outputs emptied": (edit_manifest(lambda m: m.update(outputs=[])), {}, ArtifactError,
                                 "the manifest was modified"),
    "NUL byte in a file name": (edit_manifest(lambda m: m["files"].__setitem__("a\x00b", {"sha256": "0" * 64,
                                                                                          "bytes": 1})), {},
                                ArtifactError, "control characters"),
    "foreign weights, hash fixed up": (foreign_weights_with_fixed_hash, {}, ArtifactError,
                                       "does not match the graph's parameters"),
    "junk weights, hash fixed up": (junk_weights_with_fixed_hash, {}, ArtifactError, "not a readable safetensors"),
    "path escape": (edit_manifest(lambda m: m["files"].__setitem__("../x", {"sha256": "0" * 64, "bytes": 1})), {},
                    ArtifactError, "leaves the artifact directory"),
    "absolute path": (edit_manifest(lambda m: m["files"].__setitem__("/etc/passwd", {"sha256": "0" * 64,
                                                                                     "bytes": 1})), {},
                      ArtifactError, "absolute path"),
    "symlink escaping": (symlink_out, {}, ArtifactError, "points outside the artifact directory"),
    "manifest lists a directory": (list_directory, {}, ArtifactError, "directory or special file"),
    "extra unexpected file": (lambda r: (r / "payload.py").write_text("print('hi')"), {}, ArtifactError,
                              "does not list: \\['payload.py'\\]"),
    "empty directory": (empty_directory, {}, ArtifactError, "manifest.json is missing"),
    "unknown target requested": (lambda r: None, {"target": "h100"}, TargetError, "not built for target 'h100'"),
    "cuda with only host": (lambda r: None, {"device": "cuda"}, TargetError, "no GPU target"),
    "unknown device": (lambda r: None, {"device": "tpu9"}, TargetError, "unknown device"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_artifact_is_refused_with_a_clear_error(case, template, tmp_path):
    damage, kwargs, error, pattern = CASES[case]
    root = tmp_path / "art"
    shutil.copytree(template, root, symlinks=True)
    damage(root)
    with pytest.raises(error, match=pattern) as info:
        load(root, **kwargs)
    exc = info.value
    assert isinstance(exc, LmforgeError)
    assert re.search(ADVICE, str(exc), re.IGNORECASE), f"message says what to do: {exc}"
    last = info.traceback[-1]
    assert Path(str(last.path)).resolve().is_relative_to(LMFORGE_DIR), f"raised from {last.path}"
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_an_undamaged_copy_loads(template, tmp_path):
    shutil.copytree(template, tmp_path / "art", symlinks=True)
    x = torch.randn(5, 4)
    assert load(tmp_path / "art")(x).shape == (5, 2)


def test_an_artifact_keyed_by_the_older_whole_json_graph_hash_still_loads(template, tmp_path):
    # Before Graph.signature left out node sources and capture meta, the manifest held the hash of graph.json.
    shutil.copytree(template, tmp_path / "art", symlinks=True)
    graph = lmforge.ir.Graph.from_json((tmp_path / "art" / "graph.json").read_text())
    legacy = hashlib.sha256(graph.to_json().encode()).hexdigest()[:16]
    assert legacy != graph.signature()
    edit_manifest(lambda m: m.update(graph_hash=legacy))(tmp_path / "art")
    assert load(tmp_path / "art")(torch.randn(5, 4)).shape == (5, 2)


@pytest.mark.parametrize("where", ["missing", "file"])
def test_a_path_that_is_not_an_artifact_directory_is_refused(tmp_path, where):
    path = tmp_path / "x"
    if where == "file":
        path.write_text("{}")
    with pytest.raises(ArtifactError, match="does not exist|not a directory"):
        load(path)


def test_export_refuses_a_directory_inside_an_artifact_and_names_custom_onnx_ops(template, tmp_path):
    """Exporting into a sub-directory of an artifact would add files its manifest does not list (it would no
    longer load); a model with lmforge-only ops writes model.onnx and says onnxruntime cannot run it."""
    root = tmp_path / "art"
    shutil.copytree(template, root, symlinks=True)
    compiled = lmforge.compile(torch.nn.Linear(4, 2).eval(), (torch.randn(3, 4),))
    with pytest.raises(LmforgeError, match="inside the artifact"):
        export(compiled, root / "sub")
    load(root)                                                     # still intact
    with pytest.raises(LmforgeError, match="needs a directory path"):
        export(compiled, None)
    assert manifest_of(root)["onnx"]["custom_ops"] == []

    def step(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8)
    kv8 = lmforge.compile(step, (q, k, k), config={"quant.kv": "int8"})
    out = export(kv8, tmp_path / "kv8")
    assert manifest_of(out)["onnx"]["custom_ops"] == ["kv_qdq"]
    assert "onnxruntime cannot run it" in (out / "README.md").read_text()


def test_reexporting_a_loaded_artifact_warns_that_its_gpu_kernels_are_not_carried(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU()).eval()
    compiled = lmforge.compile(model, (torch.randn(2, 64),), config={"quant.weight_bits": 8, "quant.group_size": 32})
    compiled.add_gpu_kernels(["h100"], backends=("triton",))
    first = export(compiled, tmp_path / "gpu")
    loaded = load(first)
    with pytest.warns(UserWarning, match="GPU kernels for \\['h100'\\]; they are not carried over"):
        export(loaded, tmp_path / "again")
