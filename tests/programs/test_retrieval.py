"""Retrieval in programs: the retrieve op (scoring, ties, insertion, types, errors), its cost, the search knobs, and
retrieval-augmented generation with the trained recall model (examples/rag_recall.py), compiled and exported."""
import pytest
import torch

from lmforge.errors import LmforgeError, VerifyError
from lmforge.hwmodels import get_target
from lmforge.programs import ProgramBuilder, ProgramRunner, program_cost, register_corpus
from lmforge.programs.retrieval import get_corpus, retrieve

H100 = get_target("h100")
DOCS = torch.tensor([[1, 2, 3], [4, 5, 6], [3, 4, 9], [1, 3, 4]])


def test_overlap_counts_distinct_shared_tokens_and_breaks_ties_by_index():
    corpus = register_corpus("t-overlap", DOCS)
    prompts = torch.tensor([[3, 3, 4], [7, 8, 9], [0, 0, 0]])
    out, ids = retrieve(prompts, corpus, k=2, method="overlap", insert_at=1)
    # prompt 0: tokens {3, 4}: docs 2 and 3 have both (2 each), doc 0 and 1 one each -> 2, 3
    # prompt 1: only doc 2 has 9; the rest tie at 0 -> lowest index 0; prompt 2: all tie -> 0, 1
    assert ids.tolist() == [[2, 3], [2, 0], [0, 1]]
    assert out.shape == (3, 3 + 2 * 3)
    assert out[0].tolist() == [3, 3, 4, 9, 1, 3, 4, 3, 4]
    assert out[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0]


def test_embedding_retrieval_ranks_by_dot_product():
    table = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    corpus = register_corpus("t-embed", DOCS, embed=lambda t: table[t].mean(1))
    prompts = torch.tensor([[1, 5], [9, 9]])
    _, ids = retrieve(prompts, corpus, k=4, method="embedding")
    scores = table[prompts].mean(1) @ table[DOCS].mean(1).T
    assert ids.tolist() == scores.argsort(1, descending=True).tolist()


@pytest.mark.parametrize("call,match", [
    (lambda c: retrieve(torch.zeros(1, 2, dtype=torch.long), c, k=5), "between 1 and"),
    (lambda c: retrieve(torch.zeros(1, 2, dtype=torch.long), c, k=1, insert_at=3), "insert_at"),
    (lambda c: retrieve(torch.zeros(1, 2, dtype=torch.long), c, k=1, method="embedding"), "no encoder"),
    (lambda c: retrieve(torch.zeros(1, 2, dtype=torch.long), c, k=1, method="bm25"), "method"),
    (lambda c: register_corpus("bad", torch.zeros(3)), "LongTensor"),
    (lambda c: get_corpus("nowhere"), "register_corpus"),
    (lambda c: retrieve(torch.zeros(1, 2, dtype=torch.long), c, k=2.0), "k must be an int"),
    (lambda c: retrieve(torch.zeros(1, 2, dtype=torch.long), c, k=True), "k must be an int"),
    (lambda c: retrieve(torch.zeros(1, 2, dtype=torch.long), c, k=1, insert_at=1.0), "insert_at must be an int"),
    (lambda c: retrieve(torch.zeros(2, dtype=torch.long), c, k=1), r"LongTensor \[batch, prompt_len\]"),
    (lambda c: retrieve(torch.zeros(1, 2), c, k=1), r"LongTensor \[batch, prompt_len\]"),
    (lambda c: register_corpus("bad", [[1, 2, 3], [4, 5]]), "pad the documents to one length"),
    (lambda c: register_corpus("bad", [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]), "pad the documents"),
    (lambda c: register_corpus("bad", DOCS.int()), r"\.long\(\)"),
    (lambda c: register_corpus("bad", DOCS, pad_id=True), "pad_id"),
])
def test_bad_retrieval_input_raises_lmforge_error(call, match):
    corpus = register_corpus("t-errors", DOCS)
    with pytest.raises(LmforgeError, match=match):
        call(corpus)


def _rag(step, corpus="t-overlap", k=2, **attrs):
    b = ProgramBuilder("rag", {"tiny": step})
    p = b.retrieve(corpus, k=k, insert_at=1)
    return b.build(b.generate("tiny", prompts=p, max_new_tokens=3, eos_id=12, **attrs))


def test_program_types_json_and_cost(tiny, task):
    """The retrieve node grows the prompt by k x doc_len (symbolic and static lengths); it round-trips through JSON;
    its scan of the corpus is charged per prompt and the generate node prefills the longer prompt."""
    from lmforge.ir.graph import Graph

    register_corpus("t-overlap", DOCS)
    graph = _rag(tiny[1])
    node = graph.nodes[0]
    assert node.op == "retrieve" and [str(t.type) for t in node.outputs] == ["i64[batch, prompt_len + 6]",
                                                                             "i64[batch, 2]"]
    assert Graph.from_json(graph.to_json()).signature() == graph.signature()
    b = ProgramBuilder("rag", {"tiny": tiny[1]}, prompt_len=6)
    assert b.retrieve("t-overlap", k=3).type.shape == ("batch", 15)
    prompts = task[0][:5]
    one, two = (ProgramRunner(_rag(tiny[1], k=k)).run(prompts) for k in (1, 2))
    assert [t.prompt_len for t in two.accounts[1].traces] == [prompts.shape[1] + 6] * 5
    assert two.accounts[0].queries == 5 and two.accounts[1].prompt_tokens == 5 * (prompts.shape[1] + 6)
    c1, c2 = program_cost(_rag(tiny[1], k=1), one, H100), program_cost(graph, two, H100)
    assert c2.nodes[0].eflops > 0 and c2.nodes[0].time_s > 0
    assert c2.nodes[1].eflops > c1.nodes[1].eflops          # 3 more prompt tokens to prefill
    assert c2.eflops == pytest.approx(c2.nodes[0].eflops + c2.nodes[1].eflops)
    assert torch.equal(ProgramRunner(graph, batch_prompts=False).run(prompts).tokens, two.tokens)


def test_unregistered_or_changed_corpus_is_a_clear_error(tiny, task):
    with pytest.raises(LmforgeError, match="register_corpus"):
        _rag(tiny[1], corpus="never-registered")
    register_corpus("t-changing", DOCS)
    graph = _rag(tiny[1], corpus="t-changing")
    register_corpus("t-changing", DOCS[:3])
    with pytest.raises(LmforgeError, match="rebuild the program"):
        ProgramRunner(graph).run(task[0][:2])
    with pytest.raises(VerifyError, match="k must be between"):
        b = ProgramBuilder("rag", {"tiny": tiny[1]})
        b.generate("tiny", prompts=b.retrieve("t-changing", k=4), max_new_tokens=2)


@pytest.fixture(scope="module")
def rag_world():
    from examples.rag_recall import make_world, recall_step, register_retrievers

    documents, questions, answers, gold = make_world(0)
    return recall_step(), register_retrievers(documents, dims=(4, 64)), questions[:32], answers[:32], gold[:32]


def test_retrieval_augmented_generation_answers_what_the_model_never_saw(rag_world):
    """The facts are held-out triples: without retrieval the recall model cannot answer; with the right documents
    in the prompt it can; a weak dense retriever (4 dims) is right less often, and so is the program."""
    from examples.models.recall_task import EOS
    from examples.rag_recall import INSERT_AT, recall_at
    from lmforge.hwmodels import get_target
    from lmforge.programs.search import ProgramEvaluator

    step, retrievers, questions, answers, gold = rag_world
    ev = ProgramEvaluator({"recall": step}, questions, answers, get_target("h100"), eos_id=EOS,
                          retrievers=retrievers, insert_at=INSERT_AT)
    base = {"program.model": "recall", "program.strategy": "greedy", "program.max_new_tokens": 3,
            "attn.decode_window": 0, "quant.kv": "none", "quant.weight_bits": 16}
    acc = {name: ev({**base, "program.retriever": name, "program.retrieve_k": 2}).accuracy
           for name in ("overlap", "embed-4")}
    none = ev({**base, "program.retriever": "none"})
    assert none.accuracy <= 0.1
    assert acc["overlap"] >= 0.9
    weak_recall = recall_at(2, questions, gold, *retrievers["embed-4"])
    assert weak_recall < 0.8 and acc["embed-4"] <= weak_recall + 0.1   # cannot answer what it did not retrieve
    cost = ev({**base, "program.retriever": "overlap", "program.retrieve_k": 2}).eflops
    assert cost > ev({**base, "program.retriever": "overlap", "program.retrieve_k": 1}).eflops > none.eflops


def test_search_space_has_conditional_retrieval_knobs(rag_world):
    from lmforge.programs.search import grid, program_space

    space = program_space(["recall"], max_new_choices=(3,), windows=(0,), kv=("none",), strategies=("greedy",),
                          retrievers=("overlap", "embed-4"), retrieve_k=(1, 2))
    configs = grid(space)
    assert len(configs) == 1 + 2 * 2      # no retrieval, or one of 2 retrievers x 2 values of k
    assert {c["program.retriever"] for c in configs} == {"none", "overlap", "embed-4"}


def test_a_rag_program_compiles_exports_and_loads(rag_world, tmp_path):
    import lmforge
    from examples.models.recall_task import EOS

    step, _, questions, answers, _ = rag_world
    b = ProgramBuilder("rag", {"recall": step})
    graph = b.build(b.generate("recall", prompts=b.retrieve("facts", k=2, insert_at=1), max_new_tokens=3,
                               eos_id=EOS))
    compiled = lmforge.compile(graph, target="h100")
    listing = [line for line in compiled.inspect().splitlines() if "= retrieve(" in line or "= generate(" in line]
    assert len(listing) == 2 and all("program op (cost from what it runs" in line for line in listing)
    want = ProgramRunner(graph).run(questions[:8]).tokens
    assert torch.equal(compiled(questions[:8])[0], want)
    lmforge.export(compiled, tmp_path / "rag")
    assert torch.equal(lmforge.load(tmp_path / "rag")(questions[:8])[0], want)
    documents = get_corpus("facts").documents
    try:   # the artifact does not carry the corpus: a corpus of the same shape but other documents is refused
        register_corpus("facts", documents.flip(0))
        with pytest.raises(LmforgeError, match="differs from the one the program was built"):
            lmforge.load(tmp_path / "rag")(questions[:8])
    finally:
        register_corpus("facts", documents)
    assert torch.equal(lmforge.load(tmp_path / "rag")(questions[:8])[0], want)

    # An artifact of an earlier lmforge: its nodes lack the attributes added since (generate's kv_dtype, the
    # retrieve's fingerprint) and its manifest holds that graph's signature. It loads, with the defaults.
    import hashlib
    import json

    from lmforge.ir.graph import dict_signature

    root = tmp_path / "rag"
    written = json.loads((root / "graph.json").read_text())
    for node in written["nodes"]:
        node["attrs"] = [[k, v] for k, v in node["attrs"] if k not in ("kv_dtype", "fingerprint")]
    (root / "graph.json").write_text(json.dumps(written, indent=1, sort_keys=True))
    manifest = json.loads((root / "manifest.json").read_text())
    data = (root / "graph.json").read_bytes()
    manifest["files"]["graph.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["graph_hash"] = dict_signature(written)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    old = lmforge.load(root)
    assert [n.attr["kv_dtype"] for n in old.graph.nodes if n.op == "generate"] == [""]
    assert torch.equal(old(questions[:8])[0], want)


def test_the_example_says_when_no_config_fits_the_budget():
    from examples.rag_recall import describe

    assert "no config fits the budget" in describe(None)


def test_a_list_of_equal_1d_documents_is_a_corpus():
    corpus = register_corpus("t-rows", list(DOCS))
    assert torch.equal(corpus.documents, DOCS)


def _brute_overlap(prompts, docs, pad_id=None):
    return torch.tensor([[len((set(p) & set(d)) - {pad_id}) for d in docs.tolist()] for p in prompts.tolist()])


@pytest.mark.parametrize("pad_id", [None, 0])
def test_overlap_matches_set_intersection_and_skips_the_pad_token(pad_id):
    """Scores and order against plain Python sets (ties to the lower index); with pad_id the padding token, which
    the prompts contain too, counts for nothing."""
    from lmforge.programs.retrieval import scores

    g = torch.Generator().manual_seed(3)
    docs = torch.randint(0, 9, (40, 6), generator=g)
    docs[::3, 3:] = 0                                        # padded documents
    prompts = torch.randint(0, 9, (25, 7), generator=g)
    prompts[:, :2] = 0
    corpus = register_corpus("t-sets", docs, pad_id=pad_id)
    want = _brute_overlap(prompts, docs, pad_id)
    assert torch.equal(scores(prompts, corpus, "overlap"), want.float())
    order = [sorted(range(40), key=lambda j: (-int(want[b, j]), j)) for b in range(25)]
    assert retrieve(prompts, corpus, k=40)[1].tolist() == order
    if pad_id is not None:
        assert not torch.equal(want, _brute_overlap(prompts, docs))   # the pad token did matter here


def test_overlap_scoring_needs_no_prompt_by_document_by_token_tensor():
    """Scoring B prompts of L tokens against N documents of Ld tokens allocates about N x Ld, not B x N x Ld x L."""
    from torch.profiler import ProfilerActivity, profile

    from lmforge.programs.retrieval import scores

    B, N, Ld, L = 4, 500, 32, 64
    g = torch.Generator().manual_seed(0)
    corpus = register_corpus("t-memory", torch.randint(0, 1000, (N, Ld), generator=g))
    prompts = torch.randint(0, 1000, (B, L), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = scores(prompts, corpus, "overlap")
    assert max(e.cpu_memory_usage for e in prof.events()) <= 4 * N * Ld * 8
    assert torch.equal(got, _brute_overlap(prompts, corpus.documents).float())


def _bag_corpus(name):
    """Documents that are the same bag of tokens as another one (a row and its reversal): near-ties in embedding
    scores, which a matrix product breaks differently depending on how many prompts it multiplies."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(40, 96, generator=g)
    base = torch.randint(0, 40, (200, 6), generator=g)
    corpus = register_corpus(name, torch.cat([base, base.flip(1)]), embed=lambda t: table[t].sum(1))
    return corpus, torch.randint(0, 40, (64, 5), generator=g), table


def test_embedding_retrieval_does_not_depend_on_the_batch():
    from lmforge.ir.graph import GraphBuilder
    from lmforge.ir.types import TensorType
    from lmforge.programs.retrieval import scores
    from lmforge.programs.runtime import run_node

    corpus, prompts, table = _bag_corpus("t-bag")
    batched = retrieve(prompts, corpus, k=4, method="embedding")
    alone = [retrieve(p[None], corpus, k=4, method="embedding") for p in prompts]
    assert torch.equal(batched[1], torch.cat([a[1] for a in alone]))
    assert torch.equal(batched[0], torch.cat([a[0] for a in alone]))
    want = table[prompts].sum(1).double() @ corpus.doc_embeddings.double().T    # independent reference
    assert torch.allclose(scores(prompts, corpus, "embedding").double(), want, rtol=1e-5, atol=1e-4)
    gb = GraphBuilder("g")
    x = gb.input("prompts", TensorType(("batch", 5), "int64"))
    gb.op("retrieve", [x], {"corpus": "t-bag", "k": 4, "method": "embedding", "n_docs": 400, "doc_len": 6,
                            "embed_dim": 96}, name="retrieve")
    node = gb._nodes[-1]
    one_batch, one_by_one = (run_node(None, 0, node, [prompts], None, batch) for batch in (True, False))
    assert all(torch.equal(a, b) for a, b in zip(one_batch, one_by_one))


def test_non_finite_embeddings_are_errors():
    """A NaN score sorts first: a document whose embedding is NaN (here: an all-padding document, cosine-normalised)
    would be retrieved for every prompt; a prompt's NaN embedding would retrieve arbitrary documents."""
    table = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    table[0] = 0.0

    def cosine(tokens):
        v = table[tokens].sum(1)
        return v / v.norm(dim=1, keepdim=True)

    docs = torch.tensor([[1, 2, 3], [4, 5, 6], [0, 0, 0], [7, 8, 9]])
    with pytest.raises(LmforgeError, match=r"documents \[2\]"):
        register_corpus("t-nan", docs, embed=cosine)
    corpus = register_corpus("t-nan", docs[[0, 1, 3]], embed=cosine)
    assert retrieve(torch.tensor([[7, 8, 9]]), corpus, k=1, method="embedding")[1].tolist() == [[2]]
    with pytest.raises(LmforgeError, match=r"encoder returned NaN or inf for prompts \[1\]"):
        retrieve(torch.tensor([[7, 8, 9], [0, 0, 0]]), corpus, k=1, method="embedding")


def test_builder_checks_insert_at_where_the_prompt_length_is_known(tiny):
    register_corpus("t-insert", DOCS)
    for prompt_len, insert_at in (("prompt_len", -1), (3, 4)):
        b = ProgramBuilder("rag", {"tiny": tiny[1]}, prompt_len=prompt_len)
        with pytest.raises(VerifyError, match=f"insert_at={insert_at}"):
            b.retrieve("t-insert", k=1, insert_at=insert_at)
    assert ProgramBuilder("rag", {"tiny": tiny[1]}, prompt_len=3).retrieve("t-insert", insert_at=3).type.shape == \
        ("batch", 6)


def test_a_corpus_whose_contents_changed_is_refused(tiny, task):
    """Same shape, other contents (a token, the pad token): the program was built and tuned for another corpus, so
    running it is an error; registering the same corpus again runs it, also with embeddings that differ in the
    last bits (the same encoder on another thread count or BLAS)."""
    from lmforge.ir.graph import Graph

    one, other = (torch.randn(10, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    register_corpus("t-contents", DOCS, embed=lambda t: one[t].sum(1))
    graph = _rag(tiny[1], corpus="t-contents")
    assert Graph.from_json(graph.to_json()).nodes[0].attr["fingerprint"] == get_corpus("t-contents").fingerprint
    changed = DOCS.clone()
    changed[1, 1] = 7
    for docs, pad_id in ((changed, None), (DOCS, 0)):
        register_corpus("t-contents", docs, embed=lambda t: one[t].sum(1), pad_id=pad_id)
        with pytest.raises(LmforgeError, match="differs from the one the program was built"):
            ProgramRunner(graph).run(task[0][:2])
    register_corpus("t-contents", DOCS.clone(), embed=lambda t: one[t].sum(1))
    assert ProgramRunner(graph).run(task[0][:2]).tokens.shape[0] == 2
    register_corpus("t-contents", DOCS.clone(), embed=lambda t: one[t].sum(1) * (1 + 1e-7))
    assert ProgramRunner(graph).run(task[0][:2]).tokens.shape[0] == 2


def test_a_best_of_n_scorer_reads_the_prompt_without_the_documents(tiny, task):
    """The aggregators read the user's prompt: a best-of-N scorer as well as rank / verify / fuse, in a program
    built by hand and in the search's template; batched or prompt by prompt."""
    from lmforge.programs import register_function
    from lmforge.programs.search import ProgramEvaluator

    seen = []
    register_function("t-spy", lambda prompt, cands: (seen.append(prompt.tolist()), torch.zeros(cands.shape[0]))[1])
    register_corpus("t-scorer", DOCS)
    prompts, answers = task[0][:3], task[1][:3]
    b = ProgramBuilder("rag", {"tiny": tiny[1]})
    graph = b.build(b.generate("tiny", prompts=b.retrieve("t-scorer", k=2), strategy="best_of_n", n=2,
                               aggregator="scorer", scorer="t-spy", max_new_tokens=3, eos_id=12))
    for batch_prompts in (True, False):
        seen.clear()
        ProgramRunner(graph, batch_prompts=batch_prompts).run(prompts)
        assert seen == prompts.tolist()
    ev = ProgramEvaluator({"tiny": tiny[1]}, prompts, answers, H100, eos_id=12, scorer="t-spy",
                          retrievers={"lexical": ("t-scorer", "overlap")})
    seen.clear()
    ev({"program.model": "tiny", "program.strategy": "best_of_n", "program.n": 2, "program.aggregator": "scorer",
        "program.max_new_tokens": 3, "program.retriever": "lexical", "program.retrieve_k": 1})
    assert seen == prompts.tolist()


def test_search_prunes_k_beyond_the_corpus_and_names_a_space_with_none_that_fits(tiny, task):
    from lmforge.programs.search import ProgramEvaluator, grid_search, program_space, search

    register_corpus("t-small", DOCS)      # 4 documents: k = 8 cannot be retrieved
    prompts, answers = task[0][:4], task[1][:4]
    ev = ProgramEvaluator({"tiny": tiny[1]}, prompts, answers, H100, eos_id=12,
                          retrievers={"lexical": ("t-small", "overlap")})
    space = program_space(["tiny"], max_new_choices=(4,), windows=(0,), kv=("none",), strategies=("greedy",),
                          retrievers=("lexical",), retrieve_k=(2, 8))
    g = grid_search(ev, space, budget_eflops=1e15)
    assert sorted(e.config.get("program.retrieve_k") for e in g.evaluations
                  if e.config["program.retriever"] != "none") == [2]
    s = search(ev, space, budget_eflops=1e15, n_trials=6, fidelities=(4,))
    assert all(e.config["program.retrieve_k"] != 8 or e.config["program.retriever"] == "none"
               for e in s.evaluations)
    too_big = program_space(["tiny"], max_new_choices=(4,), windows=(0,), kv=("none",), strategies=("greedy",),
                            retrievers=("lexical",), retrieve_k=(8, 16))
    for run in (lambda: grid_search(ev, too_big, budget_eflops=1e15),
                lambda: search(ev, too_big, budget_eflops=1e15, n_trials=2)):
        with pytest.raises(LmforgeError, match=r"program_space\(retrieve_k=\(8, 16\)\)"):
            run()


def test_a_retrieve_nothing_reads_is_a_warning(tiny):
    """Forgetting `prompts=` leaves the retrieve step out of the program (dead code): the builder says so."""
    register_corpus("t-unread", DOCS)
    b = ProgramBuilder("rag", {"tiny": tiny[1]})
    b.retrieve("t-unread", k=1)
    with pytest.warns(UserWarning, match=r"retrieve from corpus \['t-unread'\] is left out"):
        graph = b.build(b.generate("tiny", max_new_tokens=2, eos_id=12))
    assert [n.op for n in graph.nodes] == ["generate"]
