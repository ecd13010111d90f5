"""attn_implementation="leanattn" in Hugging Face transformers: same greedy tokens as SDPA.

Tiny random models built from configs (nothing downloaded): two layers, hidden 64, head_dim 64,
short prompts and a few new tokens, so that the kernel's calls stay cheap under the interpreter.
"""

from __future__ import annotations

import collections

import pytest
import torch

transformers = pytest.importorskip("transformers")

import leanattn  # noqa: E402
import leanattn.integrations.transformers as lt  # noqa: E402
from _util import DEVICE  # noqa: E402

LAYERS = 2
NEW_TOKENS = 5
VOCAB = 256
# Decode logits of the two backends differ by rounding that grows through the layers: a few ulps
# of bf16 (fp16) at logits of order 1. Wider spread weights than the default 0.02 keep the top
# two logits apart, so that near-ties stay rare.
LOGIT_ATOL = {torch.bfloat16: 0.15, torch.float16: 0.03, torch.float32: 0.0}
INIT_RANGE = 0.2


def tiny_model(family: str, kv_heads: int, dtype: torch.dtype, head_dim: int = 64, **extra) -> torch.nn.Module:
    """A random (LAYERS-layer, hidden 64) causal LM of ``family`` with 4 query heads of dim
    ``head_dim``."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
        initializer_range=INIT_RANGE, pad_token_id=0, **extra,
    )
    config = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[family](**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=DEVICE, dtype=dtype).eval()


def prompts(lens: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts: input_ids and attention_mask, both (batch, max(lens))."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lens)
    ids = torch.randint(1, VOCAB, (len(lens), width), generator=gen)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for row, n in enumerate(lens):
        ids[row, : width - n] = 0
        mask[row, width - n :] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def generate(model, impl: str, ids, mask, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with ``impl``: the new tokens (batch, NEW_TOKENS) and each step's logits."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            disable_compile=True,  # on a GPU, generate would compile static-cache steps by itself
            **kw,
        )
    return out.sequences[:, ids.shape[1] :], [x.float() for x in out.logits]


def assert_same_greedy(ref: tuple, got: tuple, atol: float) -> None:
    """Same tokens as the reference, except after a near-tie; logits close while inputs agree.

    Each row is compared step by step until its first different token, which is allowed only
    where the reference's top two logits are within ``2 * atol`` (rounding could flip them).
    """
    (ref_tokens, ref_logits), (tokens, logits) = ref, got
    compared = 0
    for row in range(ref_tokens.shape[0]):
        for step in range(ref_tokens.shape[1]):
            diff = (logits[step][row] - ref_logits[step][row]).abs().max().item()
            assert diff <= atol, f"row {row} step {step}: logits differ by {diff:.3g} > {atol}"
            compared += 1
            a, b = ref_tokens[row, step].item(), tokens[row, step].item()
            if a != b:
                gap = (ref_logits[step][row, a] - ref_logits[step][row, b]).item()
                assert gap <= 2 * atol, f"row {row} step {step}: token {b} != {a}, logit gap {gap:.3g} is no near-tie"
                break
    # A test that stopped comparing at once would prove nothing.
    assert compared >= ref_tokens.numel() // 2


def run_both(model, ids, mask, dtype, **kw) -> None:
    ref = generate(model, "sdpa", ids, mask, **kw)
    lt.calls.clear()
    got = generate(model, lt.NAME, ids, mask, **kw)
    assert_same_greedy(ref, got, LOGIT_ATOL[dtype])


def expect_calls(decoded: int, prefill: int = 1, prefill_on: str = lt.NAME) -> None:
    """Every layer's decode steps ran on leanattn, and its prefills on ``prefill_on``: leanattn
    for prompts of up to MAX_QUERY_TOKENS tokens, SDPA ("sdpa: prefill") for longer ones."""
    if prefill_on == lt.NAME:
        assert dict(lt.calls) == {lt.NAME: LAYERS * (decoded + prefill)}
    else:
        assert dict(lt.calls) == {lt.NAME: LAYERS * decoded, prefill_on: LAYERS * prefill}


@pytest.mark.parametrize(
    "family,kv_heads,dtype,cache",
    [
        ("llama", 2, torch.bfloat16, "dynamic"),  # GQA
        ("llama", 4, torch.float16, "static"),  # MHA
        ("qwen2", 1, torch.bfloat16, "static"),  # MQA
        ("qwen2", 4, torch.bfloat16, "dynamic"),
        ("mistral", 2, torch.float16, "dynamic"),
    ],
)
def test_greedy_matches_sdpa(family, kv_heads, dtype, cache):
    model = tiny_model(family, kv_heads, dtype)
    ids, mask = prompts([9, 9])
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    run_both(model, ids, mask, dtype, **kw)
    expect_calls(NEW_TOKENS - 1)


@pytest.mark.parametrize("head_dim", [32, 192, 512])
def test_head_dims(head_dim):
    """Small and wide heads, group 2. At d=512 a 9-token prefill is 18 query rows a kv head, over
    the kernel's 16 there: it goes to SDPA, the one-token steps to leanattn."""
    model = tiny_model("llama", 2, torch.bfloat16, head_dim=head_dim)
    ids, mask = prompts([9, 9])
    run_both(model, ids, mask, torch.bfloat16)
    expect_calls(NEW_TOKENS - 1, prefill_on="sdpa: prefill" if head_dim == 512 else lt.NAME)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padding(cache):
    # A prompt longer than MAX_QUERY_TOKENS: its prefill goes to SDPA.
    model = tiny_model("llama", 2, torch.bfloat16)
    ids, mask = prompts([lt.MAX_QUERY_TOKENS + 4, 4, 6])
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    run_both(model, ids, mask, torch.bfloat16, **kw)
    expect_calls(NEW_TOKENS - 1, prefill_on="sdpa: prefill")


@pytest.mark.parametrize("cache", ["full", "static"])
def test_sliding_window(cache):
    # A window shorter than the prompt. The static cache keeps a rolling window of keys, all live;
    # a cache that keeps every key leaves the window to the mask, whose rows then start past 0.
    model = tiny_model("mistral", 2, torch.bfloat16, sliding_window=5)
    ids, mask = prompts([8, 6])
    if cache == "static":
        run_both(model, ids, mask, torch.bfloat16, cache_implementation="static")
    else:
        ref = generate(model, "sdpa", ids, mask, past_key_values=transformers.DynamicCache())
        lt.calls.clear()
        got = generate(model, lt.NAME, ids, mask, past_key_values=transformers.DynamicCache())
        assert_same_greedy(ref, got, LOGIT_ATOL[torch.bfloat16])
    expect_calls(NEW_TOKENS - 1)


def _verify_steps(model, impl: str, ids, mask, drafts: torch.Tensor, cache: str) -> list[torch.Tensor]:
    """Speculative decoding's verification by hand: prefill, then forward ``drafts`` (batch, T)
    T tokens at a time, twice. Returns each forward's logits (batch, T, vocab)."""
    model.set_attn_implementation(impl)
    steps = 2
    if cache == "static":
        past = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps * drafts.shape[1] + 3)
    else:
        past = transformers.DynamicCache()
    logits = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=past)
        positions = mask.sum(-1, keepdim=True) - 1
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(drafts)], dim=1)
            pos = positions + torch.arange(1, drafts.shape[1] + 1, device=DEVICE)
            positions = pos[:, -1:]
            out = model(input_ids=drafts, attention_mask=mask, position_ids=pos, past_key_values=past)
            logits.append(out.logits.float())
    return logits


@pytest.mark.parametrize(
    "family,cache,tokens",
    [("llama", "dynamic", 3), ("llama", "static", 4), ("mistral", "dynamic", 3), ("mistral", "static", 2)],
)
def test_several_query_tokens_match_sdpa(family, cache, tokens):
    """Several new tokens a step (speculative decoding's verification), on a left-padded batch
    whose prompts are too long for leanattn's prefill: the multi-token steps run on leanattn,
    bottom-right causal (and each query's own window for Mistral's sliding window of 5)."""
    extra = {"sliding_window": 5} if family == "mistral" else {}
    model = tiny_model(family, 2, torch.bfloat16, **extra)
    ids, mask = prompts([lt.MAX_QUERY_TOKENS + 2, 7])
    drafts = torch.randint(1, VOCAB, (2, tokens), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ref = _verify_steps(model, "sdpa", ids, mask, drafts, cache)
    lt.calls.clear()
    got = _verify_steps(model, lt.NAME, ids, mask, drafts, cache)
    assert dict(lt.calls) == {lt.NAME: LAYERS * 2, "sdpa: prefill": LAYERS}
    for a, b in zip(ref, got):
        assert (a - b).abs().max().item() <= LOGIT_ATOL[torch.bfloat16]


def test_fp32_falls_back_to_sdpa():
    model = tiny_model("llama", 2, torch.float32)
    ids, mask = prompts([7, 5])
    run_both(model, ids, mask, torch.float32)
    assert lt.calls[lt.NAME] == 0
    assert lt.calls["sdpa: torch.float32: the kernel takes float16 and bfloat16"] == LAYERS * NEW_TOKENS  # prefill too


def test_softcapping_runs_on_leanattn():
    """Gemma 2 caps its attention logits: decode steps run on leanattn with the cap, prefill on
    the model's own eager attention (SDPA has no cap); greedy tokens as with eager."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, pad_token_id=0, attn_logit_softcapping=5.0,
        initializer_range=INIT_RANGE,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device=DEVICE, dtype=torch.bfloat16).eval()
    ids, mask = prompts([lt.MAX_QUERY_TOKENS + 3, 5])  # a prefill too long for leanattn
    ref = generate(model, "eager", ids, mask)
    lt.calls.clear()
    got = generate(model, lt.NAME, ids, mask)
    assert_same_greedy(ref, got, LOGIT_ATOL[torch.bfloat16])
    assert dict(lt.calls) == {lt.NAME: LAYERS * (NEW_TOKENS - 1), "eager: prefill": LAYERS}


def test_from_pretrained(tmp_path):
    tiny_model("llama", 2, torch.bfloat16).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=lt.NAME, dtype=torch.bfloat16)
    assert model.config._attn_implementation == lt.NAME
    lt.calls.clear()
    ids, mask = prompts([5])
    with torch.no_grad():
        model.to(DEVICE).generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    expect_calls(1)


class _GraphRecorder:
    """A torch.compile backend that keeps each graph's ops, then runs it with aot_eager."""

    def __init__(self) -> None:
        self.targets: list[set] = []
        self.counts: list[collections.Counter] = []  # calls of each function or method, per graph

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.targets.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
        self.counts.append(collections.Counter(
            # An op's overload ("decode_into.default") counts as the op.
            getattr(n.target, "__name__", str(n.target)).split(".")[0]
            for n in gm.graph.nodes if n.op in ("call_function", "call_method")))
        from torch._dynamo.backends.common import aot_autograd  # noqa: F401  (registers aot_eager)

        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def decode_loop(model, ids, mask, forward, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The transformers static-cache recipe by hand: prefill eagerly, then ``forward`` per token."""
    cache = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 3)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        tokens, logits = [], []
        positions = mask.sum(-1, keepdim=True) - 1
        for _ in range(steps):
            logits.append(out.logits[:, -1].float())
            tokens.append(logits[-1].argmax(-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            positions = positions + 1
            out = forward(input_ids=tokens[-1], attention_mask=mask, position_ids=positions, past_key_values=cache)
    return torch.cat(tokens, dim=1), logits


def assert_compiled_steps_keep(model, dtype: torch.dtype, op) -> None:
    """Greedy steps of ``model`` compiled with fullgraph=True (a static cache) give SDPA's tokens,
    and every compiled graph calls the custom op ``op`` and never SDPA."""
    torch._dynamo.reset()
    ids, mask = prompts([8, 5])
    model.set_attn_implementation("sdpa")
    ref = decode_loop(model, ids, mask, model, NEW_TOKENS)
    model.set_attn_implementation(lt.NAME)
    recorder = _GraphRecorder()
    # fullgraph=True fails on any graph break; the 2-D mask grows each step, so allow recompiles.
    compiled = torch.compile(model, fullgraph=True, backend=recorder, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=16):
        got = decode_loop(model, ids, mask, compiled, NEW_TOKENS)
    assert_same_greedy(ref, got, LOGIT_ATOL[dtype])
    assert recorder.targets, "nothing was compiled"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for ops in recorder.targets:
        assert ops & {op, op.default}, f"a decode step missed {op}"
        assert sdpa not in ops, "a compiled decode step fell back to SDPA"


def test_compiled_static_cache_has_no_graph_break():
    assert_compiled_steps_keep(tiny_model("llama", 2, torch.bfloat16), torch.bfloat16, torch.ops.leanattn.decode_into)


def test_compiled_step_reads_the_mask_once():
    """A compiled decode step computes the live range from its mask, and plans the shares, once,
    not once per layer: ``live_range`` takes two ``amax`` of the mask, whatever the layer count."""
    torch._dynamo.reset()
    model = tiny_model("llama", 2, torch.bfloat16)
    ids, mask = prompts([8, 5])
    model.set_attn_implementation(lt.NAME)
    recorder = _GraphRecorder()
    compiled = torch.compile(model, fullgraph=True, backend=recorder, dynamic=False)
    decode_loop(model, ids, mask, compiled, 1)
    (counts,) = recorder.counts
    assert counts["decode"] + counts["decode_into"] == LAYERS, counts
    assert counts["amax"] == 2, f"live_range ran {counts['amax'] // 2} times for {LAYERS} layers"
    assert counts["plan_shares"] == 1, counts


def test_compiled_several_query_tokens_have_no_graph_break():
    """A compiled verification step of 3 tokens (static cache, left padding) stays on leanattn,
    with the same logits as SDPA."""
    torch._dynamo.reset()
    model = tiny_model("llama", 2, torch.bfloat16)
    ids, mask = prompts([lt.MAX_QUERY_TOKENS + 2, 7])
    drafts = torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = _verify_steps(model, "sdpa", ids, mask, drafts, "static")
    recorder = _GraphRecorder()
    compiled = torch.compile(model.forward, fullgraph=True, backend=recorder, dynamic=False)
    original = model.forward
    model.forward = compiled
    try:
        with torch._dynamo.config.patch(recompile_limit=16):
            got = _verify_steps(model, lt.NAME, ids, mask, drafts, "static")
    finally:
        model.forward = original
    for a, b in zip(ref, got):
        assert (a - b).abs().max().item() <= LOGIT_ATOL[torch.bfloat16]
    decode_ops = {torch.ops.leanattn.decode_into, torch.ops.leanattn.decode_into.default}
    assert any(ops & decode_ops for ops in recorder.targets), "no compiled step ran on leanattn"


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool, device=DEVICE)[:, None, None, :]


def test_live_range():
    start, end, holes = lt.live_range(
        _mask([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]]), 5
    )
    assert start.tolist() == [2, 0, 0, 0, 5] and end.tolist() == [5, 6, 0, 3, 6]
    assert holes.tolist() == [False, False, False, True, False]
    assert start.dtype == end.dtype == torch.int32
    # A mask broadcast over the batch.
    start, end, holes = lt.live_range(_mask([[0, 1, 1, 0]]), 3)
    assert start.tolist() == [1] * 3 and end.tolist() == [3] * 3 and not holes.any()


def _rows(rows: list[list[list[int]]]) -> torch.Tensor:
    """A (batch, 1, q_len, kv_len) bool mask from rows per sequence."""
    return torch.tensor(rows, dtype=torch.bool, device=DEVICE)[:, None]


def test_live_range_of_several_query_tokens():
    """Bottom-right causal rows from one start (left padding) are the kernel's; a sliding
    window is too when passed; anything else is flagged."""
    causal = [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    shifted = [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]  # row 0 starts early
    window = [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]  # 3 keys each: left 2
    pad_query = [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]  # a query before the prompt
    start, end, bad = lt.live_range(_rows([causal, shifted, window, pad_query]), 4)
    assert start.tolist() == [1, 0, 1, 4] and end.tolist() == [6, 6, 6, 6]
    assert bad.tolist() == [False, True, True, False]
    _, _, bad = lt.live_range(_rows([causal, window]), 2, window_left=2)
    assert bad.tolist() == [True, False]
    _, _, bad = lt.live_range(_rows([window]), 1, window_left=1)
    assert bad.tolist() == [True]


def _call(mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode call straight through the attention function; returns it and the inputs."""
    gen = torch.Generator().manual_seed(3)
    batch, kv_len = (mask.shape[0], mask.shape[-1]) if mask is not None else (2, 6)
    q = torch.randn(batch, 4, 1, 64, generator=gen).to(DEVICE, torch.bfloat16)
    k = torch.randn(batch, 2, kv_len, 64, generator=gen).to(DEVICE, torch.bfloat16)
    v = torch.randn_like(k)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    out, weights = lt.attention_forward(module, q, k, v, mask, scaling=0.1, **kwargs)
    assert weights is None and out.shape == (batch, 1, 4, 64)
    return out, q, k, v


def test_attention_forward_matches_reference():
    lt.calls.clear()
    mask = _mask([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out, q, k, v = _call(mask)
    ref = leanattn.reference.decode(q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                                    torch.tensor([4, 6], dtype=torch.int32, device=DEVICE), softmax_scale=0.1)
    assert (out.double() - ref).abs().max().item() < 2e-2
    assert dict(lt.calls) == {lt.NAME: 1}


def _reference_for(mask: torch.Tensor, q, k, v) -> torch.Tensor:
    """The float64 reference for a mask whose rows are single runs of live keys."""
    start, end, _ = lt.live_range(mask, q.shape[0])
    return leanattn.reference.decode(q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                                     end, cache_leftpad=start, softmax_scale=0.1)


def test_eager_calls_plan_once_per_mask(monkeypatch):
    """Layers that share a mask share one plan; another mask, or the same mask changed in place,
    is planned again; every call matches the reference."""
    plans = []
    real_plan = leanattn.DecodeWrapper.plan
    monkeypatch.setattr(leanattn.DecodeWrapper, "plan", lambda self, *a, **kw: (plans.append(a), real_plan(self, *a, **kw))[1])
    full = _mask([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    window = _mask([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    for mask in (full, window, full, window):  # two layers of each kind, interleaved
        out, q, k, v = _call(mask)
        assert (out.double() - _reference_for(mask, q, k, v)).abs().max().item() < 2e-2
    assert len(plans) == 2
    full[0, 0, 0, 4] = True  # the next step's token, written in place
    out, q, k, v = _call(full)
    assert len(plans) == 3
    assert (out.double() - _reference_for(full, q, k, v)).abs().max().item() < 2e-2


def test_inference_mask_changed_in_place_is_planned_again(monkeypatch):
    """An inference tensor has no version counter: a mask made elsewhere and changed in place
    under inference_mode is planned again at every call (never a stale plan); a mask the
    integration's mask function made (marked) is planned once for all its layers."""
    plans = []
    real_plan = leanattn.DecodeWrapper.plan
    monkeypatch.setattr(leanattn.DecodeWrapper, "plan", lambda self, *a, **kw: (plans.append(a), real_plan(self, *a, **kw))[1])
    with torch.inference_mode():
        mask = _mask([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
        for step in range(2):
            out, q, k, v = _call(mask)
            assert (out.double() - _reference_for(mask, q, k, v)).abs().max().item() < 2e-2
            mask[0, 0, 0, 4 + step] = True  # the next step's token, written in place
        assert len(plans) == 2
        marked = _mask([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
        setattr(marked, lt._MARK, None)
        for _ in range(2):  # two layers of one step
            out, q, k, v = _call(marked)
            assert (out.double() - _reference_for(marked, q, k, v)).abs().max().item() < 2e-2
        assert len(plans) == 3


def test_wrappers_of_past_steps_are_reused(monkeypatch):
    """A step's plan outlives its mask only until the next plan: one wrapper serves every step."""
    made = []
    real_init = leanattn.DecodeWrapper.__init__
    monkeypatch.setattr(leanattn.DecodeWrapper, "__init__", lambda self, *a, **kw: (made.append(1), real_init(self, *a, **kw))[1])
    lt._plans.clear()
    lt._spare.clear()
    for step in range(4):
        # A new mask each step, one key longer, as with a growing cache.
        mask = _mask([[1] * (3 + step) + [0] * 3, [1] * (6 + step)])
        out, q, k, v = _call(mask)
        assert (out.double() - _reference_for(mask, q, k, v)).abs().max().item() < 2e-2
        del mask
    assert len(made) == 1 and len(lt._plans) == 1
    # Without a mask, plans differ by q_len: q_len 3 and 4 each get a plan (and a wrapper, as
    # both plans stay valid), and q_len 3 again finds its own.
    for q_len in (3, 4, 3):
        q = torch.randn(2, 4, q_len, 64, generator=torch.Generator().manual_seed(q_len)).to(DEVICE, torch.bfloat16)
        k = torch.randn(2, 2, 9, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
        module = torch.nn.Module()
        out, _ = lt.attention_forward(module, q, k, k, None, scaling=0.1)
        # No mask with several query tokens: top-left causal over the first q_len keys.
        ref = leanattn.reference.decode(q.transpose(1, 2).double(), k.transpose(1, 2).double(), k.transpose(1, 2).double(),
                                        torch.full((2,), q_len, dtype=torch.int32, device=DEVICE), softmax_scale=0.1)
        assert (out.double() - ref).abs().max().item() < 2e-2
    assert len(made) == 3


def test_generate_plans_once_per_step(monkeypatch):
    plans = []
    real_plan = leanattn.DecodeWrapper.plan
    monkeypatch.setattr(leanattn.DecodeWrapper, "plan", lambda self, *a, **kw: (plans.append(a), real_plan(self, *a, **kw))[1])
    model = tiny_model("llama", 2, torch.bfloat16)
    ids, mask = prompts([6, 4])
    lt.calls.clear()
    generate(model, lt.NAME, ids, mask)
    expect_calls(NEW_TOKENS - 1)
    assert len(plans) == NEW_TOKENS  # one per step (the short prefill's included), for both layers


def test_mask_with_holes_gives_nan_rows():
    out, *_ = _call(_mask([[1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]]))
    assert out[0].isnan().all() and out[1].isfinite().all()


def test_inexpressible_mask_gives_nan_rows_with_several_query_tokens():
    """Every row of a sequence the kernel can't express is NaN, also a row whose range in the
    kernel's terms would hold no key (query 0 of sequence 0: its mask row sees key 5, but from
    start 5 and end 6 a bottom-right row 0 sees nothing)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 2, 64, generator=gen).to(DEVICE, torch.bfloat16)
    k = torch.randn(2, 2, 6, 64, generator=gen).to(DEVICE, torch.bfloat16)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    mask = _rows([[[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]])
    out, _ = lt.attention_forward(module, q, k, k, mask, scaling=0.1)
    assert out[0].isnan().all() and out[1].isfinite().all()
    ref = _reference_for(mask[1:], q[1:], k[1:], k[1:])
    assert (out[1:].double() - ref).abs().max().item() < 2e-2


def test_sinks_are_passed_to_the_kernel():
    """gpt-oss's per-head sink logits (``s_aux``) join the decode softmax."""
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEVICE, dtype=torch.bfloat16)
    out, q, k, v = _call(None, s_aux=sinks)
    ref = leanattn.reference.decode(q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(),
                                    softmax_scale=0.1, sinks=sinks.float())
    assert (out.double() - ref).abs().max().item() < 2e-2
    plain, *_ = _call(None)
    assert (out.double() - plain.double()).abs().max().item() > 1e-2, "the sinks changed nothing"


@pytest.mark.parametrize("kwargs,reason", [({"position_bias": torch.zeros(1, 4, 1, 6, device=DEVICE)}, "position_bias")])
def test_decode_refusal(kwargs, reason):
    q = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16, device=DEVICE)
    k = torch.zeros(1, 2, 6, 64, dtype=torch.bfloat16, device=DEVICE)
    assert lt.decode_refusal(q, k, k, None, 0.0, kwargs) == reason
    assert lt.decode_refusal(q, k, k, None, 0.0, {}) is None
    assert lt.decode_refusal(q.float(), k.float(), k.float(), None, 0.0, {}).startswith("torch.float32")
    # Several query tokens run on leanattn up to MAX_QUERY_TOKENS (and 128 rows), causal only.
    few = torch.zeros(1, 4, 3, 64, dtype=torch.bfloat16, device=DEVICE)
    assert lt.decode_refusal(few, k, k, None, 0.0, {}) is None
    assert lt.decode_refusal(few, k, k, None, 0.0, {"is_causal": False}) == "not causal"
    many = torch.zeros(1, 4, lt.MAX_QUERY_TOKENS + 1, 64, dtype=torch.bfloat16, device=DEVICE)
    assert lt.decode_refusal(many, k, k, None, 0.0, {}) == "prefill"
    # Head dims: 32 to 512 run on leanattn; d=512 takes 16 query rows a kv head.
    for d in (32, 192, 512):
        kd = torch.zeros(1, 2, 6, d, dtype=torch.bfloat16, device=DEVICE)
        assert lt.decode_refusal(torch.zeros(1, 4, 1, d, dtype=torch.bfloat16, device=DEVICE), kd, kd, None, 0.0, {}) is None
    k512 = torch.zeros(1, 1, 6, 512, dtype=torch.bfloat16, device=DEVICE)

    def q512(heads: int, q_len: int) -> torch.Tensor:
        return torch.zeros(1, heads, q_len, 512, dtype=torch.bfloat16, device=DEVICE)

    assert lt.decode_refusal(q512(32, 1), k512, k512, None, 0.0, {}) == "32 query rows a kv head: the kernel takes 16 at head_dim 512"
    assert lt.decode_refusal(q512(8, 2), k512, k512, None, 0.0, {}) is None  # 16 rows
    assert lt.decode_refusal(q512(8, 3), k512, k512, None, 0.0, {}) == "prefill"  # 24 rows
    k48 = torch.zeros(1, 2, 6, 48, dtype=torch.bfloat16, device=DEVICE)
    assert lt.decode_refusal(q[..., :48], k48, k48, None, 0.0, {}).startswith("head_dim 48/48/48")
    assert lt.decode_refusal(few, k, k, torch.ones(1, 1, 1, 6, dtype=torch.bool, device=DEVICE), 0.0, {}) == "attention mask of shape (1, 1, 1, 6)"
    assert lt.decode_refusal(q, k, k, torch.zeros(1, 1, 1, 6, device=DEVICE), 0.0, {}) == "attention mask is not a boolean tensor"


def test_e2e_benchmark_smoke(tmp_path):
    """benchmarks/e2e.py --quick runs its eager path end to end and writes its results."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "e2e.py"), "--quick", "--out", str(tmp_path),
           "--modes", "eager", "--batches", "2", "--contexts", "40"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"leanattn", "sdpa", "e2e_null"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    assert "| tiny | 2 | 40 | eager |" in (tmp_path / "results.md").read_text()


def test_e2e_host_profile_smoke():
    """benchmarks/e2e_host.py profiles each backend's eager steps and times its attention calls."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "e2e_host.py"), "--model", "tiny", "--layers", "2",
           "--context", "40", "--steps", "1", "--top", "3", "--impls", "leanattn", "e2e_null"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.path.join(root, "benchmarks"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "=== leanattn:" in done.stdout and "=== e2e_null:" in done.stdout
    assert "transformers.py" in done.stdout and "(attention_forward)" in done.stdout  # the callee breakdown


def test_batch_invariant_name():
    """A registered batch-invariant name: a sequence's decode output is the same bits alone and
    left-padded in a batch with others (and right); the default name is registered too."""
    assert lt.NAME_BATCH_INVARIANT in transformers.AttentionInterface._global_mapping
    lt.register("leanattn_split_64", batch_invariant=True, split_size=64)
    forward = transformers.AttentionInterface._global_mapping["leanattn_split_64"]
    gen = torch.Generator().manual_seed(4)
    n, pad = 200, 37
    q0 = torch.randn(1, 4, 1, 64, generator=gen).to(DEVICE, torch.bfloat16)
    k0, v0 = (torch.randn(1, 2, n, 64, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    alone, _ = forward(module, q0, k0, v0, torch.ones(1, 1, 1, n, dtype=torch.bool, device=DEVICE), scaling=0.1)
    q = torch.randn(3, 4, 1, 64, generator=gen).to(DEVICE, torch.bfloat16)
    k, v = (torch.randn(3, 2, n + pad, 64, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    q[1], k[1, :, pad:], v[1, :, pad:] = q0[0], k0[0], v0[0]
    mask = torch.ones(3, 1, 1, n + pad, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :pad] = False
    mask[2, ..., 90:] = False
    lt.calls.clear()
    out, _ = forward(module, q, k, v, mask, scaling=0.1)
    assert dict(lt.calls) == {lt.NAME: 1}
    assert torch.equal(out[1], alone[0])
    ref = _reference_for(mask, q, k, v)
    assert (out.double() - ref).abs().max().item() < 2e-2
    with pytest.raises(ValueError, match="split_size must be a positive multiple"):
        lt.register("leanattn_bad", batch_invariant=True, split_size=0)


# --- DeepSeek-V3: decode steps on mla_decode over the latent cache ---

def tiny_deepseek(dtype: torch.dtype, q_lora_rank: int | None = 32, rope_interleave: bool = True) -> torch.nn.Module:
    """A random LAYERS-layer DeepSeek-V3 (dense MLPs, 4 heads; latent 32 + rope 16 = 48 values a
    cached token, qk nope 16, v 16)."""
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=LAYERS,
        first_k_dense_replace=LAYERS, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, rope_interleave=rope_interleave,
        initializer_range=INIT_RANGE, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=DEVICE, dtype=dtype).eval()


@pytest.mark.parametrize("dtype,cache,q_lora_rank,interleave", [
    (torch.float16, "dynamic", 32, True),
    (torch.bfloat16, "static", None, False),
])
def test_deepseek_v3_decode_steps_run_on_mla_decode(dtype, cache, q_lora_rank, interleave):
    """Greedy tokens equal the model's own attention's; every decode step of every layer went to
    mla_decode; left-padded prompts (their prefills longer than MAX_QUERY_TOKENS go to SDPA)."""
    from leanattn.integrations import transformers_mla

    model = tiny_deepseek(dtype, q_lora_rank, interleave)
    ids, mask = prompts([lt.MAX_QUERY_TOKENS + 3, 5, 9])
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    run_both(model, ids, mask, dtype, **kw)
    assert lt.calls[transformers_mla.PATH] == LAYERS * (NEW_TOKENS - 1)
    assert lt.calls[transformers_mla.PATH] + lt.calls["sdpa: head_dim 32/32/16: the kernel takes "
                                                      f"{leanattn.SUPPORTED_HEAD_DIMS}"] == sum(lt.calls.values())


def test_deepseek_v3_short_prompt_and_mask_with_holes():
    """A prompt of at most MAX_QUERY_TOKENS tokens is attended by mla_decode too (bottom-right
    causal over the prompt itself); a mask the kernel can't express gives NaN rows, not wrong
    ones."""
    from leanattn.integrations import transformers_mla

    model = tiny_deepseek(torch.float16)
    ids, mask = prompts([6, 6])
    run_both(model, ids, mask, torch.float16)
    assert lt.calls[transformers_mla.PATH] == LAYERS * NEW_TOKENS
    holes = mask.clone()
    holes[0, 2] = 0  # padding inside sequence 0
    model.set_attn_implementation(lt.NAME)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=holes, use_cache=True).logits
    assert torch.isnan(logits[0]).all() and torch.isfinite(logits[1]).all()


def test_deepseek_v3_other_names_keep_the_original_forward():
    """A model on SDPA (or eager) never reaches mla_decode, and fp32 decode steps fall back."""
    from leanattn.integrations import transformers_mla

    model = tiny_deepseek(torch.float32)
    ids, mask = prompts([5, 7])
    lt.calls.clear()
    generate(model, "sdpa", ids, mask)
    assert transformers_mla.PATH not in lt.calls
    generate(model, lt.NAME, ids, mask)
    assert transformers_mla.PATH not in lt.calls and sum(lt.calls.values()) > 0


def test_deepseek_v3_compiled_static_cache_has_no_graph_break():
    """A compiled DeepSeek-V3 decode step (static cache) keeps the absorbed path in one graph:
    the mla_decode custom op, no SDPA."""
    assert_compiled_steps_keep(tiny_deepseek(torch.float16), torch.float16, torch.ops.leanattn.mla_decode_into)


class _Adapted(torch.nn.Module):
    """A kv_b_proj whose ``.weight`` is not the weight it applies (as LoRA or FP8Linear's)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.base = linear
        self.weight = linear.weight
        self.delta = torch.nn.Parameter(torch.randn_like(linear.weight) * 0.2, requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.base.weight + self.delta)


def test_deepseek_v3_adapted_kv_b_proj_keeps_the_expanded_path():
    """Absorbing kv_b_proj needs its effective weight: a projection of another kind goes the
    model's own way, with SDPA's tokens."""
    from leanattn.integrations import transformers_mla

    model = tiny_deepseek(torch.float16)
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj = _Adapted(layer.self_attn.kv_b_proj)
    ids, mask = prompts([6, 9])
    run_both(model, ids, mask, torch.float16)
    assert transformers_mla.PATH not in lt.calls


def test_deepseek_v3_forward_with_autograd_takes_the_expanded_path():
    """A short forward with grad enabled (training, or eval without no_grad) builds a cache but
    must not reach the kernel, which has no backward: gradients flow."""
    from leanattn.integrations import transformers_mla

    model = tiny_deepseek(torch.bfloat16).train()
    ids, mask = prompts([6, 6])
    model.set_attn_implementation(lt.NAME)
    lt.calls.clear()
    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    assert transformers_mla.PATH not in lt.calls
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad is not None
