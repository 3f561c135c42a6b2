"""PEFT's DoRA Embedding (``peft.tuners.lora.dora.DoraEmbeddingLayer`` via ``lora.Embedding``).

Search form, as Dynamo traces peft 0.21 (``A_t = lora_embedding_A.T``,
``B_t = lora_embedding_B.T``; the table W is ``[num_embeddings, dim]`` and PEFT
takes the norm of its transpose, one entry per embedding dimension)::

    n    = detach(to(linalg_norm(W.T + s·detach((A_t @ B_t).T), dim=1)))       [dim]
    g    = m / n
    out  = g·result + (g·lora)·s          lora = embedding(ids, A_t) @ B_t,  result = embedding(ids, W)
    out  = g·result + ((g·lora)·s)·e      a scaled embedding (Gemma's embed_scale e: one value, already in result)

With ``B = lora_embedding_B [dim, r]`` and ``A = lora_embedding_A [r, num_embeddings]``,
``W.T + s·B·A`` is the usual DoRA sum, so the factored norm applies as is.

Replacement::

    n   = factored_row_norm(detach(W.T), detach(A), detach(B), s)     # fp32 [dim]
    out = compose(result, lora, m, n, None, s, dtype(out))            # g·(result + s·lora), rounded once
    out = compose(result, lora·e, m, n, None, s, dtype(out))          # with embed_scale
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from .form import ComposeMatch
from .graph_view import example_value, is_scalar, is_symbolic_scalar, op_of, strip
from .matching import LowRankSum, NotDora, Unsupported, commuted, match_low_rank_sum, match_row_norm
from .peft_compose import scale_from_norm

__all__ = ["PeftEmbeddingMatch", "match_peft_embedding"]


@dataclass(kw_only=True)
class PeftEmbeddingMatch(ComposeMatch):
    """No bias and no separate base output; ``lora_factor``: the embed_scale the DoRA term is multiplied by."""

    norm: LowRankSum


def match_peft_embedding(anchor: Node) -> PeftEmbeddingMatch:
    """Match PEFT's DoRA Embedding around a row-norm ``anchor``; raises NotDora / Unsupported."""
    low_rank = match_low_rank_sum(match_row_norm(anchor))
    nodes: list[Node] = [*low_rank.nodes, anchor]
    stored: list[Node] = []
    g, magnitude = scale_from_norm(anchor, nodes, stored)
    if len(g.users) != 2:
        raise NotDora("m / n is not used twice (the Embedding form scales the result and the LoRA output)")
    users = list(g.users)
    lora_mul = next((u for u in users if op_of(u) == "mul" and op_of(next(iter(u.users), None)) == "mul"), None)
    result_mul = next((u for u in users if u is not lora_mul and op_of(u) == "mul"), None)
    if lora_mul is None or result_mul is None:
        raise NotDora("m / n does not scale both the result and the LoRA output")
    lora = commuted(lora_mul, lambda a: a is not g)
    result = commuted(result_mul, lambda a: a is not g)
    scaled = next(iter(lora_mul.users))
    pair = commuted(scaled, lambda a: is_scalar(a) or is_symbolic_scalar(a)) if len(lora_mul.users) == 1 else None
    if lora is None or result is None or pair is None or pair[1] is not lora_mul:
        raise Unsupported("g·lora is not multiplied by the scaling")
    lora, result, scaling = lora[0], result[0], (float(pair[0]) if is_scalar(pair[0]) else pair[0])
    root = next(iter(scaled.users), None)
    dora_term, lora_factor = scaled, None
    if op_of(root) == "mul" and len(scaled.users) == 1:  # ((g·lora)·s)·embed_scale
        pair = commuted(root, lambda a: a is scaled)
        factor = strip(pair[1], ("to",)) if pair is not None else None
        value = example_value(factor)
        if value is None or value.numel() != 1 or not value.dtype.is_floating_point:
            raise Unsupported("the Embedding DoRA term is multiplied by something other than one scale")
        dora_term, lora_factor, root = root, pair[1], next(iter(root.users), None)
        nodes.append(dora_term)
    if op_of(root) != "add" or set(root.args) != {result_mul, dora_term} or len(dora_term.users) != 1:
        raise Unsupported("the two Embedding DoRA terms are not summed")
    if len(scaled.users) != 1:
        raise Unsupported("the two Embedding DoRA terms are not summed")
    if len(result_mul.users) != 1:
        raise Unsupported("g·result is used elsewhere")
    # lora = embedding(ids, A_t) @ B_t, with the norm's A and B
    if op_of(lora) != "matmul" or op_of(lora.args[0]) != "embedding":
        raise Unsupported("the LoRA output is not embedding(ids, Aᵀ) @ Bᵀ")
    a_t, b_t = lora.args[0].args[1], lora.args[1]
    if (
        op_of(a_t) != "t"
        or op_of(b_t) != "t"
        or a_t.args[0] is not low_rank.lora_A
        or b_t.args[0] is not low_rank.lora_B
    ):
        raise Unsupported("the LoRA output does not use the norm's A and B")
    r_val, l_val, root_val = example_value(result), example_value(lora), example_value(root)
    d_out = example_value(low_rank.weight).shape[0]
    if r_val is None or l_val is None or root_val is None or r_val.shape != l_val.shape or r_val.shape[-1] != d_out:
        raise Unsupported("base and LoRA outputs do not have the embedding's output shape")
    if root_val.shape != r_val.shape:
        raise Unsupported("the DoRA scale broadcasts the output to another shape")
    nodes += [lora_mul, scaled, result_mul, root]
    return PeftEmbeddingMatch(
        norm=low_rank,
        magnitude=magnitude,
        result=result,
        lora=lora,
        scaling=scaling,
        root=root,
        nodes=nodes,
        stored=stored,
        lora_factor=lora_factor,
    )
