"""The mutants ``tools/mutate.py`` applies: plausible one-line (or few-line) bugs, each with the
tests that must catch it.

An ``Edit`` names a line by a substring (``old``) that must occur on exactly ``lines`` lines of the
file (default one; an exact line text works too, leading spaces and all), and replaces ``old`` with
``new`` there, or deletes those lines when ``new`` is None. A mutant whose text is not found is
reported "not applied": the source moved on and the mutant needs updating.

``tests``: pytest arguments (files, node ids) whose run must fail with the mutant applied; ``k``
an optional ``-k`` expression. Choose the smallest selection that should kill the mutant.
``gpu=True``: only the real kernel can show the bug (the interpreter runs programs one at a time
in order, and computes dots in fp32), so the tests run only with ``--gpu`` on a CUDA machine.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAN = "src/leanattn/kernels/plan.py"
DECODE = "src/leanattn/kernels/lean_decode.py"
MERGE = "src/leanattn/merge.py"
WRAPPER = "src/leanattn/wrapper.py"
CALL = "src/leanattn/_call.py"
API = "src/leanattn/api.py"
WORKSPACE = "src/leanattn/_workspace.py"
MLA = "src/leanattn/kernels/mla_decode.py"
OPS = "src/leanattn/ops.py"
LAUNCH = "src/leanattn/_launch.py"
FEATURES = "src/leanattn/_features.py"

GPU_RACE = "tests/test_gpu.py::test_merge_race_stress"
GPU_FP8 = "tests/test_gpu.py::test_fp8_extremes"


@dataclass(frozen=True)
class Edit:
    file: str
    old: str
    new: str | None  # None: delete the matching lines
    lines: int = 1  # how many lines must contain ``old`` (all of them are edited)


@dataclass(frozen=True)
class Mutant:
    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    k: str | None = None
    gpu: bool = False
    why: str = ""


def one(file: str, old: str, new: str | None, lines: int = 1) -> tuple[Edit, ...]:
    return (Edit(file, old, new, lines),)


MUTANTS: list[Mutant] = [
    # --- the partition (plan.py) ---------------------------------------------------------------
    Mutant(
        "plan-ignores-target-share",
        one(PLAN, "programs = tl.minimum((total + TARGET_SHARE - 1) // TARGET_SHARE, num_programs)",
            "programs = tl.minimum(total, num_programs)"),
        ("tests/test_partition.py",), k="target_share",
        why="small problems would take the whole grid",
    ),
    Mutant(
        "plan-never-aligned",
        one(PLAN, "programs = tl.where(uniform & (8 * aligned >= 7 * programs), aligned, programs)",
            "programs = programs"),
        ("tests/test_partition.py",), k="aligned",
        why="equal heads would not get head-aligned shares",
    ),
    Mutant(
        "plan-window-lo-one-early",
        one(PLAN, "lo = tl.minimum(tl.maximum(live - Q_LEN - window_left, 0), live)",
            "lo = tl.minimum(tl.maximum(live - Q_LEN - window_left - 1, 0), live)"),
        ("tests/test_partition.py",), k="live_range or matches_schedule",
        why="a key no window reaches would be streamed (and a tile more counted)",
    ),
    Mutant(
        "plan-num-tiles-drops-last-key",
        one(PLAN, "(length + TILE - 1) // TILE", "(length + TILE - 2) // TILE"),
        ("tests/test_partition.py",), k="matches_schedule",
        why="a head of k * TILE + 1 keys would lose its last key",
    ),
    Mutant(
        "plan-sequence-count-off-by-one",
        one(PLAN, "done = mask & ((tl.cumsum(n, axis=0) + running) * kv_heads <= start)",
            "done = mask & ((tl.cumsum(n, axis=0) + running) * kv_heads < start)"),
        ("tests/test_partition.py",), k="matches_schedule",
        why="a share starting exactly on a sequence boundary would be located in the previous sequence",
    ),
    Mutant(
        "plan-uniform-always",
        one(PLAN, "uniform = n_min == n_max", "uniform = n_min >= 0"),
        ("tests/test_partition.py",), k="ragged_heads",
        why="ragged batches would take a head-aligned grid",
    ),
    # --- the decode kernel (lean_decode.py) -----------------------------------------------------
    Mutant(
        "decode-merge-by-pid-not-last-arriver",
        one(DECODE, "if arrived + count == chunk_last - chunk_first + 1:", "if member + count - 1 == chunk_last:"),
        (GPU_RACE,), gpu=True,
        why="the chunk's last program may merge before the others stored their partials",
    ),
    Mutant(
        "decode-relaxed-tickets-no-barriers",
        (
            Edit(DECODE, 'arrived = tl.atomic_add(ChunkTickets + chunk_slot, count, sem="acq_rel"',
                 'arrived = tl.atomic_add(ChunkTickets + chunk_slot, count, sem="relaxed"'),
            Edit(DECODE, 'arrived = tl.atomic_add(Tickets + first, 1, sem="acq_rel"',
                 'arrived = tl.atomic_add(Tickets + first, 1, sem="relaxed"'),
            Edit(DECODE, "tl.debug_barrier()", None, lines=2),
        ),
        ("tests/test_gpu.py::test_merge_orders_partials_before_tickets", GPU_RACE), gpu=True,
        why="the merger may read partials before they are visible (a race this narrow rarely shows under "
            "the stress test; the compiled code's ordering test sees it)",
    ),
    Mutant(
        "decode-merge-kernel-drops-last-member",
        one(DECODE, "live = j <= last", "live = j < last"),
        ("tests/test_decode.py",), k="merge_kernel",
        why="the merge kernel would leave out the head's last member's partial",
    ),
    Mutant(
        "decode-merge-kernel-steps-not-rescaled",
        one(DECODE, "acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], axis=0)",
            "acc = acc + tl.sum(a * w[:, :, None], axis=0)"),
        ("tests/test_decode.py",), k="rescales_across_load_steps",
        why="a head of more members than one step loads would mis-weigh the earlier steps",
    ),
    Mutant(
        "decode-merge-kernel-first-slot-ignored",
        one(DECODE, "slot = _partial_slot(j, first, first_odd).to(tl.int64)", "slot = (2 * j).to(tl.int64)"),
        ("tests/test_decode.py",), k="merge_kernel",
        why="a head whose first program's share started in the head before would merge that head's partial",
    ),
    Mutant(
        "decode-merge-kernel-whole-head-job-kept",
        one(DECODE, "tl.store(Jobs + 4 * (b * kv_heads + h), -1)  # nothing to merge", "pass"),
        ("tests/test_decode.py",), k="jobs_rewritten",
        why="a head whole in this call would be merged again from an earlier call's partials",
    ),
    Mutant(
        "decode-merge-kernel-invariant-whole-head-job-kept",
        one(DECODE, "tl.store(Jobs + 4 * (b * kv_heads + h), -1)  # one split: nothing to merge", "pass"),
        ("tests/test_batch_invariant.py",), k="jobs_rewritten",
        why="in batch-invariant mode a head of one split would be merged again from an earlier call's partials",
    ),
    Mutant(
        "decode-merge-kernel-invariant-slot-shifted",
        one(DECODE, "slot = j.to(tl.int64)", "slot = (j + 1).to(tl.int64)"),
        ("tests/test_batch_invariant.py",), k="merge_kernel",
        why="batch-invariant heads would merge the next split's (or head's) partial in place of their own",
    ),
    Mutant(
        "decode-merge-kernel-invariant-last-split-dropped",
        one(DECODE, "(g - t + n_units - 1).to(tl.int32), 0)", "(g - t + n_units - 2).to(tl.int32), 0)"),
        ("tests/test_batch_invariant.py",), k="merge_kernel",
        why="batch-invariant heads would lose their last split",
    ),
    Mutant(
        "decode-merge-kernel-no-v-scale",
        one(DECODE, "v_scale = _head_scale(VScale, b, h, kv_heads, V_SCALE_KIND)  # 1 for per-token", "v_scale = 1.0  #"),
        ("tests/test_fp8_scales.py",), k="merge_kernel",
        why="cut heads of an fp8 cache with per-head or per-sequence V scales would not be dequantised",
    ),
    Mutant(
        "decode-merge-kernel-no-wait",
        one(DECODE, "gdc_wait()  # the partials and Jobs come from the kernel before", "pass"),
        ("tests/test_gpu.py::test_merge_orders_partials_before_tickets", GPU_RACE), gpu=True,
        why="with PDL the merge would read partials and jobs before the decode kernel wrote them (a race "
            "the stress test rarely sees; the compiled code's order test does)",
    ),
    Mutant(
        "decode-fp8-prescale-16",
        one(DECODE, "up, down = _pow2_factors(amax, 13.0)", "up, down = _pow2_factors(amax, 16.0)"),
        (GPU_FP8,), gpu=True,
        why="q scaled to [2^16, 2^18) overflows fp16 (the interpreter's fp32 dots hide it)",
    ),
    Mutant(
        "decode-in-range-includes-length",
        one(DECODE, "in_range = tok < length", "in_range = tok <= length"),
        ("tests/test_decode.py",), k="ragged_edges",
        why="one key past the live range would be attended to",
    ),
    Mutant(
        "decode-online-softmax-acc-not-rescaled",
        one(DECODE, "acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)", "acc = acc + tl.dot(p.to(DOT_DTYPE), v)"),
        ("tests/test_decode.py",), k="ragged_edges",
    ),
    Mutant(
        "decode-online-softmax-l-not-rescaled",
        one(DECODE, "l_i = l_i * alpha + tl.sum(p, axis=1)", "l_i = l_i + tl.sum(p, axis=1)"),
        ("tests/test_decode.py",), k="ragged_edges",
    ),
    Mutant(
        "decode-combine4-acc-not-rescaled",
        one(DECODE, "acc = acc * alpha[:, None] + a0 * w0[:, None]", "acc = acc + a0 * w0[:, None]"),
        ("tests/test_decode.py",), k="chunk",
        why="merges of more than four partials would mis-weigh the earlier ones",
    ),
    Mutant(
        "decode-combine4-l-not-rescaled",
        one(DECODE, "l_i = l_i * alpha + l0 * w0", "l_i = l_i + l0 * w0"),
        ("tests/test_decode.py",), k="chunk",
    ),
    Mutant(
        "decode-lse-in-log2-units",
        one(DECODE, "(m_i + tl.log2(tl.where(has_mass, l_i, 1.0))) * LN2", "(m_i + tl.log2(tl.where(has_mass, l_i, 1.0)))"),
        ("tests/test_decode.py",), k="ragged_edges",
        why="the LSE would be log2, not natural log",
    ),
    Mutant(
        "decode-page-upper-bound-dropped",
        one(DECODE, "(page < 0) | (page >= num_pages)", "(page < 0)"),
        ("tests/test_safety.py",), k="out_of_range_page_gives and num_pages",
        why="a page id past the pool would be read (under the interpreter the read lands in whatever memory "
            "follows the pool: the [decode-num_pages] case passed by reading NaN there, [wrapper-num_pages] killed it)",
    ),
    Mutant(
        "decode-chunk-ticket-never-reset",
        one(DECODE, "tl.atomic_xchg(ChunkTickets + chunk_slot, 0", None),
        ("tests/test_decode.py",), k="chunk or tickets_back_at_zero",
        why="the next call's count on that ticket would start from a stale value",
    ),
    Mutant(
        "decode-head-ticket-never-reset",
        one(DECODE, "tl.atomic_xchg(Tickets + first, 0", None),
        ("tests/test_decode.py",), k="chunk or tickets_back_at_zero",
        why="the next call's count on that ticket would start from a stale value",
    ),
    Mutant(
        "decode-one-chunk-test-off-by-one",
        one(DECODE, "if last - first < ARRIVE_CHUNK:", "if last - first <= ARRIVE_CHUNK:"),
        ("tests/test_decode.py",), k="one_head_over_chunk_boundaries",
        why="a head of ARRIVE_CHUNK + 1 programs would be written by its first chunk alone",
    ),
    Mutant(
        "decode-partial-slot-off-by-one",
        one(DECODE, "programs.to(tl.int64)) < head_first", "programs.to(tl.int64)) <= head_first"),
        ("tests/test_decode.py",), k="ragged_edges or chunk",
        why="a head starting exactly at its first program's share start would read slot 2p + 1",
    ),
    Mutant(
        "decode-floor-div-fp32",
        one(DECODE, "return (x.to(tl.float64) / d.to(tl.float64)).to(tl.int64)",
            "return (x.to(tl.float32) / d.to(tl.float32)).to(tl.int64)"),
        ("tests/test_schedule_tree.py",), k="floor_div",
        why="an fp32 quotient rounds x / d to the next integer for large x: the wrong first or last program",
    ),
    Mutant(
        "decode-window-left-bound-off-by-one",
        one(DECODE, "(key[None, :] >= query[:, None] - window_left)", "(key[None, :] > query[:, None] - window_left)"),
        ("tests/test_features.py",), k="sliding_window",
        why="each row would see one key less than its window",
    ),
    # --- merge_states (merge.py) ----------------------------------------------------------------
    Mutant(
        "merge-combine-acc-no-alpha",
        one(MERGE, "acc = acc * alpha[:, None] + o * w[:, None]", "acc = acc + o * w[:, None]"),
        ("tests/test_merge_states.py",),
    ),
    Mutant(
        "merge-combine-l-no-alpha",
        one(MERGE, "l = l * alpha + w", "l = l + w"),
        ("tests/test_merge_states.py",),
    ),
    Mutant(
        "merge-load-part-no-empty-guard",
        one(MERGE, 'tl.where((lse > float("-inf"))[:, None], o, 0.0)', "o"),
        ("tests/test_merge_states.py",),
        why="an empty part's garbage (NaN) output would reach the sum (0 * NaN)",
    ),
    Mutant(
        "wrapper-plan-layout-drops-q_len",
        one(WRAPPER, "cache_leftpad, bounds), batch, capacity, q_len,", "cache_leftpad, bounds), batch, capacity,"),
        ("tests/test_wrapper.py",), k="seen_layout",
        why="a run of a layout seen before would skip the check against a re-plan of another q_len",
    ),
    Mutant(
        "call-swaps-kv-strides",
        one(CALL, "*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],",
            "*q.stride()[:3], *v_cache.stride()[:3], *k_cache.stride()[:3], *out.stride()[:3],"),
        ("tests/test_decode.py",), k="hf_layout",
        why="the launch would read K's strides for V",
    ),
    Mutant(
        "decode-known-key-drops-causal",
        one(API, "options = (type(softmax_scale), softmax_scale, type(causal), causal, type(softcap), softcap,",
            "options = (type(softmax_scale), softmax_scale, type(softcap), softcap,"),
        ("tests/test_known_layouts.py",),
        why="a non-causal call of a layout seen causal would reuse the causal kernel call",
    ),
    Mutant(
        "decode-known-skips-plan-check",
        one(API, "            check_plan(plan, q, num_programs, known.plan_key)", "            pass"),
        ("tests/test_known_layouts.py",),
        why="a plan made for another call would be used on a known layout",
    ),
    Mutant(
        "workspace-keeps-views-after-growth",
        one(WORKSPACE, "            self.views.clear()", "            pass"),
        ("tests/test_decode.py",), k="workspace_views",
        why="a call of a size seen before would get views of retired buffers",
    ),
    Mutant(
        "mla-drops-rope-scores",
        one(MLA, "qk = tl.dot(q_r, tl.trans(k_r), acc=qk)", "qk = qk"),
        ("tests/test_mla.py",),
        why="the scores would leave out the rope columns' product",
    ),
    Mutant(
        "mla-tma-drops-rope-scores",
        one(MLA, "qk = tl.dot(KRDesc.load([row, 0 if ROPE_APART else DV]).to(DOT_DTYPE), q_rt, acc=qk)", "qk = qk"),
        ("tests/test_mla.py",),
        why="the TMA loop's scores would leave out the rope columns' product",
    ),
    Mutant(
        "mla-tma-reads-bad-pages",
        one(MLA, "        s = tl.where(keep & bad_page, float(\"nan\"), s)", "        s = s"),
        ("tests/test_mla.py",), k="bad_page",
        why="a live key on an out-of-range page would be read as row 0's values instead of NaN-ing its rows",
    ),
    Mutant(
        "mla-tma-tile-offset-in-page",
        one(MLA, "row = tl.where(bad_page, 0, page * PAGE_SIZE + (tile * TILE) % PAGE_SIZE)",
            "row = tl.where(bad_page, 0, page * PAGE_SIZE)"),
        ("tests/test_mla.py",), k="paged",
        why="every tile of a page larger than a tile would read the page's first tile",
    ),
    Mutant(
        "mla-ignores-leftpad",
        one(MLA, "        pos = first + tok  # cache positions", "        pos = tok  # cache positions"),
        ("tests/test_mla.py",), k="leftpad",
        why="the pointer loop would read a left-padded sequence's keys from position 0",
    ),
    Mutant(
        "mla-tma-ignores-leftpad",
        one(MLA, "row = b * capacity + first + tile * TILE", "row = b * capacity + tile * TILE"),
        ("tests/test_mla.py",), k="leftpad",
        why="the TMA loop would read a left-padded sequence's keys from position 0",
    ),
    Mutant(
        "mla-rope-apart-read-from-kv",
        one(MLA, "k_r = tl.load(KR + r_rows[:, None] + offs_r[None, :]", "k_r = tl.load(KV + r_rows[:, None] + offs_r[None, :]"),
        ("tests/test_mla.py",), k="rope_cache_apart",
        why="the pointer loop would take a separate rope cache's rows from the latent cache",
    ),
    Mutant(
        "mla-tma-rope-apart-column",
        one(MLA, "KRDesc.load([row, 0 if ROPE_APART else DV])", "KRDesc.load([row, DV])"),
        ("tests/test_mla.py",), k="rope_cache_apart",
        why="the TMA loop would read a separate rope cache past its columns",
    ),
    Mutant(
        "mla-tma-keeps-dead-rows",
        one(MLA, "        kv = tl.where(in_range[:, None], kv, 0.0)", "        kv = kv"),
        ("tests/test_mla.py",), k="slots_past",
        why="NaN in the dead slots after a sequence's length would reach its output through 0 x NaN",
    ),
    Mutant(
        "mla-tma-in-batch-invariant-mode",
        one("src/leanattn/_mla_call.py", "view = None if split or (has_leftpad and page_size) else",
            "view = None if (has_leftpad and page_size) else"),
        ("tests/test_mla.py",), k="batch_invariant_bits",
        why="a batch-invariant sequence's bits would depend on its cache's layout",
    ),
    Mutant(
        "mla-merge-one-level",
        one(MLA, "            if last - first < ARRIVE_CHUNK:", "            if True:"),
        ("tests/test_mla.py",), k="merge_kernel",
        why="a block of several chunks would be written by each chunk's last member, from that chunk only",
    ),
    Mutant(
        "mla-merge-chunk-merged-early",
        one(MLA, "if pid == tl.minimum(chunk_first + ARRIVE_CHUNK - 1, last):",
            "if pid == tl.minimum(chunk_first + ARRIVE_CHUNK - 2, last):"),
        ("tests/test_mla.py",), k="merge_kernel",
        why="a chunk would be merged by its next-to-last member, without the last one's partial",
    ),
    Mutant(
        "mla-merge-ticket-never-reset",
        one(MLA, "tl.atomic_xchg(ticket, 0", None),
        ("tests/test_mla.py",), k="merge_kernel",
        why="the next launch's count on that ticket would start from a stale value and never reach the last",
    ),
    Mutant(
        "mla-merge-ticket-shared-by-columns",
        one(MLA, "ticket = Tickets + first * tl.num_programs(1) + tl.program_id(1)", "ticket = Tickets + first"),
        ("tests/test_mla.py",), k="merge_kernel",
        why="the column chunks' programs would count on one ticket, so a column would merge before its last chunk",
    ),
    Mutant(
        "mla-merge-last-chunk-too-early",
        one(MLA, "if arrived == (last - first) // ARRIVE_CHUNK:", "if arrived == (last - first) // ARRIVE_CHUNK - 1:"),
        ("tests/test_mla.py",), k="merge_kernel",
        why="the next-to-last chunk would merge the chunks' sums, the last one's not yet stored",
    ),
    Mutant(
        "mla-merge-relaxed-ticket-no-barrier",
        (Edit(MLA, 'tl.atomic_add(ticket, 1, sem="acq_rel"', 'tl.atomic_add(ticket, 1, sem="relaxed"'),
         Edit(MLA, "tl.debug_barrier()", None)),
        ("tests/test_mla.py::test_gpu_merge_kernel_orders_chunk_sums_before_tickets",), gpu=True,
        why="other threads' stores of a chunk's sum would not be ordered before its ticket",
    ),
    Mutant(
        "mla-merge-chunk-sums-through-l1",
        one(MLA, ', cache_modifier=".cg"', "", lines=3),
        ("tests/test_mla.py::test_gpu_merge_kernel_orders_chunk_sums_before_tickets",), gpu=True,
        why="the last chunk could read another SM's chunk sum from a stale L1 line",
    ),
    Mutant(
        "mla-merge-chunk-sum-slot",
        one(MLA, "s1 = 2 * tl.num_programs(0) + tl.minimum(first + (k + 1) * ARRIVE_CHUNK + ARRIVE_CHUNK - 1, last)",
            "s1 = 2 * tl.num_programs(0) + tl.minimum(first + (k + 1) * ARRIVE_CHUNK + ARRIVE_CHUNK - 2, last)"),
        ("tests/test_mla.py",), k="merge_kernel",
        why="the second level would read a chunk's sum from a slot no chunk wrote",
    ),
    Mutant(
        "mla-merge-skips-a-member",
        one(MLA, "acc, m_i, l_i = _merge_cols(WsAcc, WsStats, chunk_first, pid, first, last, head_first, total,",
            "acc, m_i, l_i = _merge_cols(WsAcc, WsStats, chunk_first + 1, pid, first, last, head_first, total,"),
        ("tests/test_mla.py",), k="merge_kernel",
        why="a cut block's first member's tiles would be left out of its output",
    ),
    Mutant(
        "hf-mla-absorbs-any-kv_b_proj",
        one("src/leanattn/integrations/transformers_mla.py",
            "    if type(module.kv_b_proj) is not torch.nn.Linear or module.kv_b_proj.weight.dtype not in _WEIGHT_DTYPES:",
            "    if module.kv_b_proj.weight.dtype not in _WEIGHT_DTYPES:"),
        ("tests/test_transformers.py",), k="adapted",
        why="a quantized or adapted kv_b_proj's raw .weight would be absorbed in place of the weight it applies",
    ),
    Mutant(
        "mla-known-layout-skips-grad",
        one("src/leanattn/mla.py",
            '        refuse_grad(q, kv_cache, rope_cache, names=("q", "kv_cache", "rope_cache"))  # grad is not layout',
            "        pass"),
        ("tests/test_mla.py",), k="known_layouts",
        why="a tensor that requires grad would be detached silently once its layout was seen",
    ),
    Mutant(
        "mla-known-layout-skips-value-checks",
        one("src/leanattn/mla.py",
            "            _check_values(kv_cache, cache_seqlens, cache_leftpad, block_table, kv_scale, q.shape[0], known.capacity)",
            "            pass"),
        ("tests/test_mla.py",), k="known_layouts",
        why="check=True would stop checking the lengths once their layout was seen",
    ),
    Mutant(
        "checks-skip-head-strides",
        one("src/leanattn/_checks.py", "    check_head_strides(k_cache, v_cache)", "    pass"),
        ("tests/test_errors.py",), k="head_offsets",
        why="a heads-outermost cache over 2^31 elements would be read at wrapped int32 head offsets",
    ),
    Mutant(
        "split-loop-keeps-max",
        one(DECODE, '            m_i = tl.where(done, float("-inf"), m_i)', "            m_i = m_i"),
        ("tests/test_batch_invariant.py",), k="multi_tile_splits or every_sequence_is_right",
        why="a program holding several splits of a head would carry one split's running max (and with it, "
            "through alpha = 1, its sums) into the next",
    ),
    Mutant(
        "split-loop-keeps-last-split",
        one(DECODE, "            done = done & ((tile + 1 < tile_end) | flush_last)",
            "            done = done & (tile + 1 < tile_end)"),
        ("tests/test_batch_invariant.py",), k="multi_tile_splits or every_sequence_is_right",
        why="a share's last split of a cut head would arrive without leaving its partial",
    ),
    Mutant(
        "split-arrivals-count-one",
        one(DECODE, "    if arrived + count == chunk_last - chunk_first + 1:",
            "    if arrived + 1 == chunk_last - chunk_first + 1:"),
        ("tests/test_batch_invariant.py",), k="multi_tile_splits or every_sequence_is_right",
        why="a program's splits of one chunk arrive on one ticket: the last arriver would be misjudged",
    ),
    Mutant(
        "resident-shared-one-more",
        one("src/leanattn/_launch.py", "    least = sm_bytes // (per_sm + 1) + 1", "    least = sm_bytes // (per_sm + 2) + 1"),
        ("tests/test_launch.py",),
        why="the padded launch would still let one more program than the config's share an SM",
    ),
    Mutant(
        "launch-drops-padding",
        one("src/leanattn/_launch.py", "            packed = (*packed[:2], shared, *packed[3:])", "            pass"),
        ("tests/test_gpu.py",), k="keeps_programs_per_sm", gpu=True,
        why="the kernel would launch with only the shared memory it needs, so an SM could hold a third program",
    ),
    Mutant(
        "direct-launch-own-metadata",
        one("src/leanattn/_launch.py", "        launcher(gx, gy, 1, stream, compiled.function, packed, meta, enter,",
            "        launcher(gx, gy, 1, stream, compiled.function, compiled.packed_metadata, meta, enter,"),
        ("tests/test_launch.py",), k="run_direct",
        why="direct launches would drop the padded shared memory, and the cap with it",
    ),
    Mutant(
        "direct-launch-tensors-not-addresses",
        one(LAUNCH, "            args[i] = args[i].data_ptr()", "            args[i] = args[i]"),
        ("tests/test_launch.py",), k="run_direct",
        why="Triton's launcher would take data_ptr() and query the driver for every tensor again",
    ),
    # --- the merge kernel's block and the large-call config -------------------------------------
    Mutant(
        "merge-load-flat",
        one(CALL, "    return MERGE_LOAD if merge_rows <= 8 else MERGE_LOAD // 2", "    return MERGE_LOAD"),
        ("tests/test_decode.py",), k="rule_and_shape",
        why="merge steps of 16 or more rows would hold 8192 values: two live steps spill",
    ),
    Mutant(
        "merge-members-uncapped",
        one(CALL, "    members = min(MERGE_MEMBERS, next_pow2(min(busy, -(-busy // heads) + 1)))",
            "    members = next_pow2(min(busy, -(-busy // heads) + 1))"),
        ("tests/test_decode.py",), k="rule_and_shape",
        why="a grid larger than two programs an SM would give merge steps of more members than any checked",
    ),
    Mutant(
        "decode-ignores-large-calls",
        one(CALL, "    big = large(q.device, batch * kv_heads, capacity)", "    big = False"),
        ("tests/test_decode.py",), k="large_calls",
        why="large calls would keep the six-stage config (3-5% slower in serving, 12-15% eager past SMs heads)",
    ),
    Mutant(
        "plan-op-ignores-large-calls",
        one(OPS, "    if large_programs_per_sm and _call.large(device, heads, capacity):", "    if False:"),
        ("tests/test_gpu.py",), k="plan_of_a_large_call", gpu=True,
        why="plan_decode would deal one program an SM where decode runs two: the plan's grid and decode's differ",
    ),
    Mutant(
        "call-key-ignores-given-out",
        one(CALL, "        out_layout = (out.shape, out.stride(), out.dtype, out.device)", "        out_layout = None"),
        ("tests/test_wrapper.py", "tests/test_decode.py"),
        why="a call writing into a given out of other strides would reuse the strides of an earlier call's output",
    ),
    Mutant(
        "plan-keeps-raised-tickets",
        one("src/leanattn/_plan.py", "                  ZERO_TICKETS=tickets is not None)", "                  ZERO_TICKETS=False)"),
        ("tests/test_wrapper.py", "tests/test_mla.py"), k="unplanned_lengths",
        why="a run on lengths changed without a plan would leave tickets raised and break every later step",
    ),
    Mutant(
        "layer-shape-memo-ignores-types",
        one("src/leanattn/_checks.py",
            "    key = tuple((type(x), x) for x in (q_heads, kv_heads, head_dim, dtype, kv_dtype, q_len, device))",
            "    key = (q_heads, kv_heads, head_dim, dtype, kv_dtype, q_len, device)"),
        ("tests/test_wrapper.py",), k="other_types",
        why="a float head count equal to a passed int one would skip the type check",
    ),
    Mutant(
        "planned-tickets-shared",
        one("src/leanattn/_workspace.py", "        base = self.tickets.numel() // 2 if planned else 0", "        base = 0"),
        ("tests/test_wrapper.py",), k="plan_decode_recovers",
        why="a decode on a stale plan would leave raised the tickets that calls without a plan draw",
    ),
    Mutant(
        "window-int-max-side-bounded",
        one(FEATURES, "    left = UNBOUNDED if left < 0 or left > UNBOUNDED else left", "    left = UNBOUNDED if left < 0 else left"),
        ("tests/test_features.py",), k="int_max",
        why="a left window side of INT_MAX would be an int32 bound whose position sum overflows: every key masked",
    ),
    Mutant(
        "eager-form-under-capture",
        one(CALL, "        if self.eager_params is not None and not torch.cuda.is_current_stream_capturing():",
            "        if self.eager_params is not None:"),
        ("tests/test_decode.py",), k="one_launch",
        why="a CUDA graph would capture the eager form (the ticket tree) where the rule gives the merge kernel",
    ),
    Mutant(
        "shared-limit-lowered",
        one(LAUNCH, "    if _RAISED_SHARED.get(function, 0) >= size:", "    if False:"),
        ("tests/test_launch.py", "tests/test_gpu.py::test_one_compile_under_several_programs_per_sm"),
        k="shared_limit or several_programs_per_sm",
        why="a compiled kernel's shared-memory limit, raised for two programs an SM, would be lowered for three, "
            "and the next launch for two would fail",
    ),
    Mutant(
        "wrapper-plan-key-constant",
        one(WRAPPER, "        self._plan_key = self._plan_layouts.setdefault(layout, len(self._plan_layouts))",
            "        self._plan_key = 0"),
        ("tests/test_wrapper.py",),
        why="a run after a plan of another batch, grid or window would reuse the call built for the first plan",
    ),
]
