"""The MTEB adapter: MTEB's own evaluation (the mteb package, tasks built from local data, no download) scores what
an independent computation from ``Encoder.encode`` says; both of MTEB's call shapes route the instructions."""
from types import SimpleNamespace

import mteb  # the test extra installs it (and the mteb extra), so this test never skips
import numpy as np
import pytest
import torch
from _helpers import random_texts
from datasets import Dataset, DatasetDict  # mteb's own dependency
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from scipy.stats import spearmanr

from are_fast.encoding.mteb_adapter import MTEBModel

INSTRUCTIONS = {"query": "Find:", "document": "Passage:", "LocalSTS": "Same meaning?"}
DOCS = [text.strip() or "x" for text in random_texts(16, seed=21)]  # MTEB strips corpus texts
QUERIES = [doc[: max(1, len(doc) // 2)].strip() or "x" for doc in DOCS[:8]]  # query i: half of document i
PAIRS = random_texts(20, seed=22)
STS_SCORES = [float(s) for s in np.random.default_rng(0).uniform(0, 5, size=10)]


def _metadata(name: str, kind: str, main_score: str) -> TaskMetadata:
    return TaskMetadata(name=name, type=kind, main_score=main_score, description="local test data",
                        reference=None, dataset={"path": "local", "revision": "0"}, category="t2t",
                        eval_splits=["test"], eval_langs=["eng-Latn"], modalities=["text"], date=None,
                        dialect=None, domains=None, task_subtypes=None, license=None, annotations_creators=None,
                        sample_creation=None, bibtex_citation=None)


class LocalRetrieval(AbsTaskRetrieval):
    metadata = _metadata("LocalRetrieval", "Retrieval", "ndcg_at_10")

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_list([{"id": f"q{i}", "text": t} for i, t in enumerate(QUERIES)]),
            corpus=Dataset.from_list([{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]),
            relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(len(QUERIES))}, top_ranked=None)}}
        self.data_loaded = True


class LocalSTS(AbsTaskSTS):
    metadata = _metadata("LocalSTS", "STS", "cosine_spearman")
    min_score, max_score = 0, 5

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentence1": PAIRS[:10], "sentence2": PAIRS[10:], "score": STS_SCORES})})
        self.data_loaded = True


def test_mteb_evaluate_runs_through_the_adapter(encoder):
    results = mteb.evaluate(MTEBModel(encoder, INSTRUCTIONS), [LocalRetrieval(), LocalSTS()], cache=None,
                            show_progress_bar=False)
    scores = {r.task_name: r.scores["test"][0] for r in results.task_results}

    # Retrieval: the rank of each query's document among all 16 by cosine, each side with its instruction.
    sims = encoder.similarity(encoder.encode(QUERIES, prompt="Find:"), encoder.encode(DOCS, prompt="Passage:"))
    ranks = [1 + int((sims[i] > sims[i, i]).sum()) for i in range(len(QUERIES))]
    assert len(set(ranks)) > 1  # the test data separates a right ranking from a wrong one
    assert scores["LocalRetrieval"]["mrr_at_10"] == pytest.approx(np.mean([1 / r if r <= 10 else 0 for r in ranks]),
                                                                   abs=1e-6)
    ndcg = np.mean([1 / np.log2(r + 1) if r <= 10 else 0 for r in ranks])
    assert scores["LocalRetrieval"]["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-5)  # MTEB rounds to 5 digits

    # STS: Spearman correlation of the pairs' cosines with the gold scores.
    a, b = encoder.encode(PAIRS[:10], prompt="Same meaning?"), encoder.encode(PAIRS[10:], prompt="Same meaning?")
    expected = spearmanr(encoder.similarity_pairwise(a, b).numpy(), STS_SCORES).statistic
    assert scores["LocalSTS"]["cosine_spearman"] == pytest.approx(expected, abs=1e-6)
    assert results.model_name == "are_fast/" + encoder.path.rstrip("/").split("/")[-1]


def test_mteb_adapter_both_call_shapes(encoder):
    model = MTEBModel(encoder, {"query": "Q:", "Sick-document": "D:"}, default_instruction="X:")
    texts = random_texts(7, seed=5)
    # MTEB 1.x: sentences and a task name.
    v1 = model.encode(texts, task_name="Sick", prompt_type=SimpleNamespace(value="query"), batch_size=32)
    np.testing.assert_allclose(v1, encoder.encode(texts, prompt="Q:"), rtol=0, atol=1e-6)
    # MTEB 2.x: a DataLoader of {"text": [...]} batches, the task in task_metadata.
    loader = torch.utils.data.DataLoader([{"text": t} for t in texts], batch_size=3)
    v2 = model.encode(loader, task_metadata=SimpleNamespace(name="Sick"), hf_split="test", hf_subset="default",
                      prompt_type="document")
    np.testing.assert_allclose(v2, encoder.encode(texts, prompt="D:"), rtol=0, atol=1e-6)
    assert model.instruction_for("Other", None) == "X:"
    assert MTEBModel(encoder).instruction_for("Other", "query") is None  # then the encoder's default prompt
    sims = model.similarity(v1, v2)
    assert sims.shape == (7, 7)
    torch.testing.assert_close(torch.diagonal(sims), model.similarity_pairwise(v1, v2))
    meta = model.mteb_model_meta
    assert meta.embed_dim == encoder.hidden_size and meta.similarity_fn_name.value == "cosine"
