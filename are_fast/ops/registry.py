"""The op registry: every row epilogue ("kind") and every public head op, each declared once.

A ``Kind`` is what one row of a fused pass computes from its logits: its streams, what each row needs (an
int64 target, range-checked, or a bool valid flag), its float parameters (JSD's beta) and its implementation
per epilogue family ("torch": the PyTorch epilogues, run by the ``chunked`` and ``online`` backends' chunk
driver; "triton"; "native"), plus its online sweep where there is one. An ``Op`` is a public function of
``are_fast.ops.functional`` (same name in ``are_fast.ops.reference``, its float64 oracle) with its kind, its
nn.Module and the shape of its inputs. The custom op, the chunk driver, the online sweep, the backend table, the
demo, the benchmarks, the tests and the CLIs' choices read these tables.

A backend whose family lacks a kind's implementation runs the kind's torch epilogue on the chunk driver and
says so once (``epilogue_for``); a kind without an online sweep runs on the chunk driver. Never another kind's math.

Adding an op: its reference formula (reference.py), its torch epilogue (torch_epilogues.py), a ``Kind`` and an
``Op`` here, its public function (functional.py) and module (modules.py); a Triton kernel (kernels/), native
kernels and an online sweep are optional, each one line in its ``Kind``.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

_log = logging.getLogger("are_fast")


@dataclass(frozen=True)
class Kind:
    name: str
    streams: int  # hidden streams per row (1: a target's log-probability; 2: a distance between two streams)
    row_label: str  # "target": int64 target per row (ignore_index: skipped); "valid": bool per row
    implementations: dict  # epilogue family ("torch", "triton", "native") -> "module:function"
    online: str | None = None  # "module:Class" of its online sweep (are_fast.ops.online), None: chunk driver only
    params: tuple = ()  # names of its float parameters, passed to every implementation by keyword


_EPI = "are_fast.ops.torch_epilogues"
KINDS = {
    kind.name: kind
    for kind in (
        Kind("logprob", 1, "target", {
            "torch": f"{_EPI}:logprob_epilogue",
            "triton": "are_fast.kernels.logprob_epilogue:logprob_epilogue",
            "native": "are_fast.ops.native:logprob_epilogue",
        }, online="are_fast.ops.online:_LogprobSweep"),
        Kind("kl", 2, "valid", {
            "torch": f"{_EPI}:kl_epilogue",
            "triton": "are_fast.kernels.kl_epilogue:kl_epilogue",
            "native": "are_fast.ops.native:kl_epilogue",
        }, online="are_fast.ops.online:_KLSweep"),
        Kind("jsd", 2, "valid", {
            "torch": f"{_EPI}:jsd_epilogue",
            "triton": "are_fast.kernels.jsd_epilogue:jsd_epilogue",
            "native": "are_fast.ops.native:jsd_epilogue",
        }, online="are_fast.ops.online_jsd:JSDSweep", params=("beta",)),
    )
}


@dataclass(frozen=True)
class Op:
    name: str  # the function in are_fast.ops.functional and in are_fast.ops.reference
    kind: str  # its row epilogue (KINDS)
    module: str | None  # its nn.Module in are_fast.ops.modules (None: none)
    inputs: str  # "tokens": hidden [N, H], targets [N]; "sequences": hidden [B, T, H], labels [B, T];
    #              "pair": hidden_p, hidden_q [B, T, H], labels [B, T] -> [B] (a distance between two streams)
    distance: str | None = None  # its name as a stage-2 distance (--distance), for "pair" ops


OPS_TABLE = {
    op.name: op
    for op in (
        Op("token_logprobs", "logprob", None, "tokens"),
        Op("sequence_logprobs", "logprob", "SequenceLogprobs", "sequences"),
        Op("compression_loss", "logprob", "CompressionLoss", "sequences"),
        Op("conditional_kl", "kl", "ConditionalKL", "pair", distance="kl"),
        Op("conditional_jsd", "jsd", "ConditionalJSD", "pair", distance="jsd"),
    )
}
OPS = tuple(OPS_TABLE)
# Stage 2's distances between the two positive streams: "logprob" (the released |log-likelihood gap|) and
# every pair op's, by its distance name.
DISTANCES = {op.distance: op.name for op in OPS_TABLE.values() if op.distance}


def kind(name: str) -> Kind:
    """The Kind called ``name``; ValueError naming the known ones otherwise."""
    if name not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {name!r}")
    return KINDS[name]


def load(path: str):
    """The object at "module:attribute", imported on use."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


_said: set = set()


def say_once(message: str) -> None:
    """Log ``message`` at WARNING level the first time it comes (a fallback the caller should know about)."""
    if message not in _said:
        _said.add(message)
        _log.warning(message)


def epilogue_for(kind_name: str, family: str):
    """The row epilogue of ``kind_name`` in the epilogue family ``family`` ("torch", "triton", "native"); a
    family without one gives the kind's torch epilogue, saying so once."""
    spec = kind(kind_name)
    path = spec.implementations.get(family)
    if path is None:
        say_once(f"are_fast: the {family} backend has no {kind_name!r} epilogue; running its PyTorch epilogue "
                 "on the chunk driver")
        path = spec.implementations["torch"]
    return load(path)


def online_sweep(kind_name: str):
    """The online sweep class of ``kind_name``, or None where it has none (the chunk driver runs it)."""
    path = kind(kind_name).online
    return None if path is None else load(path)
