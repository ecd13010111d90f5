"""torch.compile sees leanattn.decode as one custom op: no graph breaks, same results."""

import torch

import leanattn

from _util import assert_close, make_inputs, reference


def attention_block(q, k, v, seqlens, w):
    # Some ordinary ops around the attention call, as in a model's decode step.
    out, lse = leanattn.decode(q * 1.0, k, v, seqlens, return_lse=True, num_programs=5)
    return out @ w, lse


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v, sl = make_inputs([70, 0, 33], 8, 2, 64, torch.float16)
    w = torch.eye(64, dtype=torch.float16, device=q.device)
    compiled = torch.compile(attention_block, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v, sl, w)
    ref, ref_lse = reference(q, k, v, sl)
    assert_close(out, lse, ref, ref_lse)
    explanation = torch._dynamo.explain(attention_block)(q, k, v, sl, w)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    # New lengths, same shapes: no recompilation needed, right answer.
    sl2 = torch.tensor([5, 70, 1], dtype=torch.int32, device=q.device)
    out2, lse2 = compiled(q, k, v, sl2, w)
    assert_close(out2, lse2, *reference(q, k, v, sl2))


def test_custom_op_opcheck():
    q, k, v, sl = make_inputs([40, 9], 4, 2, 64, torch.float16)
    out = torch.empty_like(q)
    lse = torch.empty(2, 4, 1, dtype=torch.float32, device=q.device)
    torch.library.opcheck(
        torch.ops.leanattn.decode_into.default, (q, k, v, out, lse, sl, None, 0.125, 3),
        test_utils=("test_schema", "test_faketensor"),
    )


def planned_step(q, k, v, seqlens):
    # One plan per step, read by every layer (two here).
    plan = leanattn.plan_decode(seqlens, k.shape[1], q_heads=q.shape[2], kv_heads=k.shape[2], head_dim=q.shape[3],
                                kv_dtype=k.dtype, num_programs=5)
    return leanattn.decode(q, k, v, seqlens, plan=plan) + leanattn.decode(q * 2.0, k, v, seqlens, plan=plan)


def test_compiled_plan_decode_matches_eager():
    torch._dynamo.reset()
    q, k, v, sl = make_inputs([70, 0, 33], 8, 2, 64, torch.float16)
    explanation = torch._dynamo.explain(planned_step)(q, k, v, sl)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(planned_step, fullgraph=True, backend="aot_eager")
    for lens in ([70, 0, 33], [1, 70, 12]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        assert torch.equal(compiled(q, k, v, sl), planned_step(q, k, v, sl))


def test_plan_op_opcheck():
    _, _, _, sl = make_inputs([40, 9], 4, 2, 64, torch.float16)
    torch.library.opcheck(
        # (seqlens, leftpad, batch, kv_heads, capacity, q_len, window_left, has_window, tile, target_share,
        #  programs_per_sm, num_programs)
        torch.ops.leanattn.plan_shares.default, (sl, None, 2, 2, 40, 1, 2**30, False, 32, 1, 1, 3, sl.device),
        test_utils=("test_schema", "test_faketensor"),
    )
