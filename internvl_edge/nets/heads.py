"""The small nets around the decoder: token embedding, greedy head and sampling head.

The sampling head follows the seed's `sample_head` (LLM-TPU / TPU-MLIR LlmConverter): it reduces the
vocabulary-wide logits to the k best candidates and their probabilities on the device, so only k
values leave it; the final draw (one uniform number) happens on the host with a seeded generator.

    logits [B, V], penalty_ids [B, n]
      repetition penalty on the logits of penalty_ids (positive / penalty, negative * penalty)
      TopK(top_k) -> / temperature -> Softmax -> keep the smallest prefix whose mass reaches top_p
      -> probs [B, k] (renormalised), token_ids [B, k]
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..checkpoint.reader import Checkpoint
from .graph import Graph
from .linear import stored_rows


def build_embedding(ckpt: Checkpoint, store: str, weights) -> Graph:
    cfg = ckpt.config.text
    g = Graph("embedding", weights)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    data, elem = stored_rows(ckpt.raw("language_model.model.embed_tokens.weight"), store)
    table = g.weight("model.embed_tokens.weight", data, elem)
    x = g.op("Gather", [table, ids], "/model/embed_tokens/Gather", axis=0)
    if elem != TensorProto.FLOAT:  # gather the half-precision rows, widen only those
        x = g.op("Cast", [x], "/model/embed_tokens/Cast", to=TensorProto.FLOAT)
    g.output(x, "inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", cfg.hidden_size])
    return g


def build_greedy_head() -> Graph:
    g = Graph("greedy_head", None)
    logits = g.input("logits", TensorProto.FLOAT, ["batch", "vocab"])
    token = g.op("ArgMax", [logits], "/greedy_head/ArgMax", axis=1, keepdims=0)
    g.output(token, "token_ids", TensorProto.INT64, ["batch"])
    return g


def build_sample_head() -> Graph:
    g = Graph("sample_head", None)
    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    logits = g.input("logits", F, ["batch", "vocab"])
    penalty_ids = g.input("penalty_ids", I64, ["batch", "penalty_tokens"])
    penalty = g.input("repetition_penalty", F, [1])
    temperature = g.input("temperature", F, [1])
    top_k = g.input("top_k", I64, [1])
    top_p = g.input("top_p", F, [1])

    seen = g.op("GatherElements", [logits, penalty_ids], "/sample_head/penalty/GatherElements", axis=1)
    positive = g.op("Greater", [seen, g.const(0.0, np.float32)], "/sample_head/penalty/Greater")
    divided = g.op("Div", [seen, penalty], "/sample_head/penalty/Div")
    multiplied = g.op("Mul", [seen, penalty], "/sample_head/penalty/Mul")
    penalised = g.op("Where", [positive, divided, multiplied], "/sample_head/penalty/Where")
    logits = g.op("ScatterElements", [logits, penalty_ids, penalised], "/sample_head/penalty/ScatterElements", axis=1)
    values, ids = g.op("TopK", [logits, top_k], "/sample_head/TopK", outputs=2, axis=-1, largest=1, sorted=1)
    scaled = g.op("Div", [values, temperature], "/sample_head/temperature/Div")
    probs = g.op("Softmax", [scaled], "/sample_head/Softmax", axis=-1)
    before = g.op("CumSum", [probs, g.const(1)], "/sample_head/top_p/CumSum", exclusive=1)
    within = g.op("Less", [before, top_p], "/sample_head/top_p/Less")
    disabled = g.op("GreaterOrEqual", [top_p, g.const([1.0], np.float32)], "/sample_head/top_p/disabled")
    keep = g.op("Or", [within, disabled], "/sample_head/top_p/Or")
    kept = g.op("Mul", [probs, g.op("Cast", [keep], "/sample_head/top_p/Cast", to=F)], "/sample_head/top_p/Mul")
    total = g.op("ReduceSum", [kept, g.const([1])], "/sample_head/top_p/ReduceSum", keepdims=1)
    probs = g.op("Div", [kept, total], "/sample_head/top_p/Div")
    g.output(probs, "probs", F, ["batch", "candidates"])
    g.output(ids, "token_ids", I64, ["batch", "candidates"])
    return g
