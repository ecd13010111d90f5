"""Context-parallel decode: every rank holds a slice of each sequence's KV cache.

Each rank attends with the LSE over the tokens it holds (a :class:`leanattn.DecodeWrapper`, the
kernel of :func:`leanattn.decode` planned once per step), then the ranks
exchange their (output, LSE) partials through one torch.distributed collective and merge them
exactly with :func:`leanattn.merge_states` (NCCL on GPUs, gloo on CPUs). Attention over a set of
keys does not depend on their order, so the merge is exact however the tokens are dealt; a rank
that holds nothing of a sequence gives zeros with LSE -inf there, and the merge ignores it.

How tokens are dealt: round-robin pages
---------------------------------------
Token ``i`` of a sequence lies on page ``i // page_size``, and page ``j`` lives on rank
``j % world_size`` (at local page ``j // world_size``). :func:`round_robin_lengths` gives each
rank's local lengths and :func:`round_robin_slot` where a new token goes. We chose this over
contiguous ranges (rank r holding tokens [r N / W, (r + 1) N / W)) because:

- **Appending.** Decode appends one token per step. With contiguous ranges every append of a
  sequence lands on the rank that holds its tail, which fills up and falls behind until the
  ranges are re-cut (moving KV between GPUs). Dealt pages rotate the appends through the ranks
  with nothing ever moved.
- **Balance for ragged lengths.** Every sequence is spread over the ranks to within one page, so
  each rank holds about 1/W of the batch's tokens whatever the mix of lengths, at every step.
- **Paged caches.** Each rank keeps its own page pool and block table; dealing pages is the unit
  such a cache already allocates in. A contiguous (batch, cache_len, ...) cache works too: a
  rank's cache then holds its pages back to back.

For one query token per sequence (plain decode) only the local lengths and block tables depend
on this choice: :class:`ContextParallelDecode` takes whatever each rank holds (``plan(local_seqlens,
...)``), so callers with another layout (ranges from a ring-attention prefill, say) can use it
unchanged.

Global positions: several query tokens, leftpad, windows
--------------------------------------------------------
Several query tokens (speculative decoding's verification step), ``cache_leftpad`` and
``window_size`` mask keys by their position in the whole sequence, which a rank's slice does not
keep. Given the global lengths and the dealt page size instead of the local lengths
(``plan(None, ..., seqlens=, page_size=)``), the plan recovers them: a rank's keys are in
increasing global position, so the keys a query at global position P may see (causal, window
(wl, wr)) are a contiguous range of the rank's keys, ``[held(max(P - wl, leftpad)),
held(min(P + wr + 1, seqlen)))``, where ``held(x)`` counts the rank's tokens at global positions
below ``x`` (:func:`round_robin_lengths` of ``x``). The plan computes these bounds for every
(sequence, query token) with torch ops on the device (no host sync, capturable in a CUDA graph)
and the kernel masks each query row with them. Keys before the first query's range are skipped
whole: the rank's live range starts there (a local leftpad), so the partition deals no tile of
them. A rank holding no key a query may see gives that row zeros and LSE -inf, which the merge
ignores.

The merge
---------
Replicated output (default): every rank packs its partial output and its LSE into one fp32
buffer (the output in q's dtype and the LSE: the kernel writes both there directly, and the
output goes at half the bytes of fp32), ``all_gather`` collects the W buffers, and every
rank merges the same gathered bytes in rank order with the same kernel: the result is bitwise
identical on every rank and from run to run. With ``scatter_heads=True`` each rank instead
sends each peer the peer's share of the heads (``all_to_all``, the reduce-scatter shape) and
gets back only its own q_heads / W heads, merged the same way: 1/W of the merge traffic and work.

``exchange="symmetric"`` replaces the collective and the merge launch by one kernel
(``merge.push_merge_kernel``, buffers in ``_symmetric.py``): each rank's receive buffer lives in
torch symmetric memory, mapped into every rank; a rank writes its partial rows (or, scattered,
each peer's heads) straight into every rank's buffer, raises one flag a program on each rank,
waits until every rank's flag for its program reaches this call, and merges the W records in
rank order with the all-gather path's math, so the bits are the same. The flags hold call
numbers (each program's own flag, plus one, is the next call's number), so nothing is reset
between calls and a CUDA graph replays the exchange as captured; calls alternate between two
slots, because a fast rank may push the next layer's rows while a slow one still merges this
layer's, but cannot get two calls ahead (its next merge waits for the slow rank's next push).
"""

from ._exchange import pack_views
from ._layout import round_robin_lengths, round_robin_slot
from .context_parallel import ContextParallelDecode, decode

__all__ = ["ContextParallelDecode", "decode", "pack_views", "round_robin_lengths", "round_robin_slot"]
