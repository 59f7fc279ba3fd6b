"""The reference-score job: log p(pos | c(q)) and log p(neg_j | c(q)) of every stage-2 row under the stage-1
model, batched in inference mode, stored as safetensors against row ids.

File layout (safetensors): ``ref_p`` [N] float32, ``ref_n`` [N, n] float32, ``fingerprint`` [N] int64 (a hash
of each row's texts), metadata ``row_ids`` (JSON list, the order of the tensors), ``num_negatives`` and
``format``, and what the scores were computed with: ``scored_with`` (JSON: the stage-1 model's fingerprint,
k, the length limits), checked by stage 2 against its --model. Loading looks every data row up by id and
checks its fingerprint, so a shuffled or filtered data file still gets its own scores, and a data file that
does not match the scores is refused with a clear error.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from .data import fingerprint, stage2_items
from ..model import reference_scores
from ..runtime import written_atomically
from .progress import Progress

FORMAT = "are_fast.reference_scores/1"


def compute_reference_scores(compressor, decoder, rows, batch_size: int = 32, backend=None, progress=True,
                             stop=None, log_interval: float = 30.0):
    """Scores of ``rows`` (dicts from ``load_stage2``) in their order: (ref_p [N], ref_n [N, n]) float32 on CPU.

    Rows are batched by length (fewer padded tokens); results return to input order. ``stop``: an
    ``errors.StopSignals``; after a signal the current batch ends the job with ``Interrupted``. ``progress``: a
    bar on a terminal, else a line every ``log_interval`` seconds.
    """
    items = stage2_items(rows, compressor, decoder)
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    n = len(rows[0]["neg"]) if rows else 0
    ref_p, ref_n = torch.empty(len(items)), torch.empty(len(items), n)
    bar = Progress(len(items), "reference scores", progress, interval_s=log_interval, unit="row")
    for start in range(0, len(order), batch_size):
        index = order[start: start + batch_size]
        p, neg = reference_scores(compressor, decoder, [items[i] for i in index], backend)
        ref_p[index], ref_n[index] = p.cpu(), neg.cpu()
        bar.update(len(index))
        if stop is not None and stop.requested and start + batch_size < len(order):
            bar.close()
            raise stop.interrupted(f"after {start + len(index)} of {len(order)} rows; nothing was written",
                                   "rerun the same command")
    bar.close()
    return ref_p, ref_n


def save_reference_scores(path: str, rows, ref_p: torch.Tensor, ref_n: torch.Tensor,
                          scored_with: dict | None = None) -> None:
    """Write scores of ``rows`` atomically (temporary file, then rename)."""
    tensors = {"ref_p": ref_p.float().contiguous(), "ref_n": ref_n.float().contiguous(),
               "fingerprint": torch.tensor([fingerprint(r) for r in rows], dtype=torch.int64)}
    meta = {"format": FORMAT, "row_ids": json.dumps([r["id"] for r in rows]), "num_negatives": str(ref_n.shape[1]),
            "scored_with": json.dumps(scored_with or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with written_atomically(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def scored_with(path: str) -> dict:
    """What the scores of ``path`` were computed with (the ``scored_with`` metadata; {} in older files)."""
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("scored_with", "{}"))


def load_reference_scores(path: str, rows) -> dict:
    """{row id: (ref_p float, ref_n list)} for every row of ``rows``; ValueError when any row has no score,
    a different number of negatives, or texts that differ from those scored."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"reference scores {path!r}: not an are_fast reference-score file")
            ref_p, ref_n, prints = f.get_tensor("ref_p"), f.get_tensor("ref_n"), f.get_tensor("fingerprint")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"reference scores {path!r} cannot be read: {err}") from None
    except Exception as err:  # safetensors raises its own error type on corrupt headers
        if isinstance(err, ValueError):
            raise
        raise ValueError(f"reference scores {path!r} cannot be read: {err}") from None
    index = {row_id: i for i, row_id in enumerate(json.loads(meta["row_ids"]))}
    missing = [r["id"] for r in rows if r["id"] not in index]
    if missing:
        raise ValueError(f"reference scores {path!r} have no score for {len(missing)} of {len(rows)} data rows "
                         f"(first: {missing[:3]}); rerun the ref-scores job on this data file")
    if rows and len(rows[0]["neg"]) != ref_n.shape[1]:
        raise ValueError(f"reference scores {path!r} hold {ref_n.shape[1]} negatives per row, the data "
                         f"{len(rows[0]['neg'])}; use the same --num-negatives for both jobs")
    changed = [r["id"] for r in rows if int(prints[index[r["id"]]]) != fingerprint(r)]
    if changed:
        raise ValueError(f"reference scores {path!r}: {len(changed)} rows have texts that differ from those "
                         f"scored (first: {changed[:3]}); rerun the ref-scores job on this data file")
    return {r["id"]: (float(ref_p[index[r["id"]]]), ref_n[index[r["id"]]].tolist()) for r in rows}
