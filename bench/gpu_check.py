"""One run on a CUDA machine (issue 15 item 5): the adapter library and the generation path on a GPU, in one go.

A random Llama-shaped backbone built from a config (no downloads; hidden 2048, 16 layers, 16 query / 4 KV heads,
intermediate 5632, vocab 32000, tied embeddings so the generator has an LM head), bf16, slot pools on; 200
adapters with noisy weights (LoRA r8 and r16, seq_bn, prefix tuning with 30 positions, (IA)^3). Sections, each
printed as soon as it is done (a timeout still leaves the earlier tables), each failing alone (its error is
printed and the next one runs); no new section starts once --budget-s has passed:

1. backbone: build time, size, device, dtype;
2. adapters: add_adapter time per method, and load_adapter from saved folders (cold load p50/p99, the pinned,
   non-blocking copy path of adapters_core/methods/staging.py), loaded weights checked equal to the saved ones
   and a forward right after back-to-back loads (no synchronisation) checked against the originals;
7. device placement (run early, it is cheap): after a mixed forward every adapter parameter and every slot pool
   buffer is on the device and every slot parameter is read from its pool; host syncs in one mixed forward
   (torch.cuda.set_sync_debug_mode) fewer than the layers;
3. mixed-batch forward ratios (bench/mixed_batch.py's cases and table): bare backbone, one adapter, BatchSplit
   over many distinct adapters, per method and mixed, CUDA-synchronised, median of rounds;
4. generation through server/execution/generator.py's Generator in-process: 64 streams on 64 distinct adapters
   against the same streams bare (block None), greedy, ignore_eos; HF `generate` static batch of the bare model
   for reference; host syncs in one decode step;
5. bf16 against a float32 copy (same weights, on the same device) through a few adapters: max abs difference of
   the last hidden states and of the logits relative to their scale, PASS within 2e-2;
6. CUDA memory (allocated now / peak since the previous point) after the backbone, the adapters, the forwards,
   the generation and the float32 copy.

Run: `python bench/gpu_check.py` (GPU); `python bench/gpu_check.py --device cpu --small` (a CPU smoke at tiny
sizes). Exit status 0 when every section ran and every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` and the libraries importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import LlamaConfig

from adapters_core import AdapterSetup, AutoAdapterModel
from bench.common import round_robin
from bench.gpu_support import (
    FULL,
    SECTIONS,
    SMALL,
    Sizes,
    State,
    counting_syncs,
    noisy,
    out,
    pct,
    sync_rows,
    table,
)
from bench.mixed_batch import build_cases, print_ratios, runner, split
from server.execution.generator import Generator, KVShape, Limits, Sampling, SeqSpec

#: method label -> adapter config string ({p}: the prefix length of the run's sizes)
METHODS = {
    "lora_r8": "lora[r=8]",
    "lora_r16": "lora[r=16,alpha=16]",
    "seq_bn": "seq_bn",
    "prefix": "prefix_tuning[prefix_length={p}]",
    "ia3": "ia3",
}
TOLERANCE = 2e-2  # bf16 against float32: max abs difference relative to the float32 tensor's max abs value
PREFILL_CHUNK = 256  # server/settings.py's prefill_chunk_tokens default


# -- 1 -----------------------------------------------------------------------------------------------------
def llama_config(s: Sizes) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Any, str]:
    """A random adapter model built straight on `device` when torch allows (else on the CPU and moved)."""
    torch.manual_seed(seed)
    where = f"built on {device.type}"
    try:
        with torch.device(device):
            model = AutoAdapterModel.from_config(config, attn_implementation="sdpa")
    except Exception as e:  # report it and take the slow way
        out(f"- building on {device} failed ({type(e).__name__}: {e}); building on the CPU and moving")
        model = AutoAdapterModel.from_config(config, attn_implementation="sdpa")
        where = "built on cpu, moved"
    return model.to(device=device, dtype=dtype).eval(), where


def section_backbone(state: State) -> None:
    s = state.sizes
    state.config = llama_config(s)
    start = time.perf_counter()
    model, where = build_model(state.config, state.device, state.dtype)
    model.enable_adapter_slots()  # after the final device and dtype, as the docstring asks
    state.sync()
    took = time.perf_counter() - start
    state.model = model
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    devices = sorted({str(p.device) for p in params})
    table(["backbone", "value"], right=2, rows=[
        ["shape", f"Llama: hidden {s.hidden}, {s.layers} layers, {s.heads} q / {s.kv_heads} kv heads, "
                  f"intermediate {s.intermediate}, vocab {s.vocab}, tied embeddings"],
        ["parameters", f"{n / 1e6:.1f} M ({sum(p.numel() * p.element_size() for p in params) / 2**20:.0f} MiB)"],
        ["dtype / devices", f"{state.dtype} / {', '.join(devices)}"],
        ["build", f"{took:.2f} s ({where})"],
        ["attention", model.config._attn_implementation],
        ["slot pools", "on" if model.adapters_registry.host.stack_cache.slots.enabled else "off"],
    ])
    state.snapshot("backbone")


# -- 2 -----------------------------------------------------------------------------------------------------
def section_adapters(state: State) -> None:
    s, model = state.sizes, state.model
    labels = list(METHODS)
    add_ms: dict[str, list[float]] = {m: [] for m in labels}
    state.names = {m: [] for m in labels}
    for i in range(s.adapters):
        method = labels[i % len(labels)]
        name = f"{method}_{i // len(labels)}"
        state.sync()
        start = time.perf_counter()
        model.add_adapter(name, config=METHODS[method].format(p=s.prefix_length))
        state.sync()
        add_ms[method].append((time.perf_counter() - start) * 1000)
        noisy(model, name, seed=i)
        state.names[method].append(name)
    state.names = {m: pool for m, pool in state.names.items() if pool}

    # cold loads from saved folders: every load synchronised, so each sample is the whole load
    folders = {}
    for method, pool in state.names.items():
        folders[method] = state.tmp / f"saved_{method}"
        model.save_adapter(str(folders[method]), pool[0])
    load_ms: dict[str, list[float]] = {m: [] for m in folders}
    mismatched: list[str] = []
    rows_before = model.adapter_slot_stats()["rows"]
    for rep in range(s.cold_loads):
        for method, folder in folders.items():
            name = f"cold_{method}_{rep}"
            state.sync()
            start = time.perf_counter()
            model.load_adapter(str(folder), load_as=name)
            state.sync()
            load_ms[method].append((time.perf_counter() - start) * 1000)
            if not _same_weights(model, state.names[method][0], name):
                mismatched.append(name)
            model.delete_adapter(name)
    rows_after = model.adapter_slot_stats()["rows"]

    rows = []
    for method in state.names:
        params = model.adapter_parameters(state.names[method][0])
        rows.append([method, len(state.names[method]), f"{pct(add_ms[method], 50):.2f}", f"{pct(add_ms[method], 99):.2f}",
                     f"{pct(load_ms[method], 50):.2f}", f"{pct(load_ms[method], 99):.2f}", len(load_ms[method]),
                     f"{sum(p.numel() for p in params) / 1e3:.1f} k",
                     f"{sum(p.numel() * p.element_size() for p in params) / 2**10:.0f}"])
    every = [t for v in load_ms.values() for t in v]
    rows.append(["all", sum(len(p) for p in state.names.values()), f"{pct([t for v in add_ms.values() for t in v], 50):.2f}",
                 f"{pct([t for v in add_ms.values() for t in v], 99):.2f}", f"{pct(every, 50):.2f}", f"{pct(every, 99):.2f}",
                 len(every), "", ""])
    table(["method", "adapters", "add ms p50", "add ms p99", "cold load ms p50", "cold load ms p99", "loads",
           "params / adapter", "KiB / adapter"], rows)
    state.check("loaded weights equal the saved ones", not mismatched,
                f"{len(every) - len(mismatched)}/{len(every)} loads bit-identical" + (f"; differ: {mismatched[:5]}" if mismatched else ""))
    state.check("slot rows freed by delete_adapter", rows_after == rows_before, f"rows {rows_before} -> {rows_after}")

    # back-to-back loads with no synchronisation between them (the staging buffer is reused while the
    # previous transfer may be in flight), then at once a forward under each: outputs as the originals'
    pairs = {method: f"b2b_{method}" for method in folders}
    for method, name in pairs.items():
        model.load_adapter(str(folders[method]), load_as=name)
    worst, detail = 0.0, []
    with torch.inference_mode():
        ids = state.inputs()
        for method, name in pairs.items():
            with AdapterSetup(name):
                fresh = model(**ids).last_hidden_state.float()
            with AdapterSetup(state.names[method][0]):
                orig = model(**ids).last_hidden_state.float()
            rel = float((fresh - orig).abs().max() / orig.abs().max().clamp_min(1e-12))
            worst = max(worst, rel)
            detail.append(f"{method} {rel:.1e}")
    equal = all(_same_weights(model, state.names[m][0], n) for m, n in pairs.items())
    for name in pairs.values():
        model.delete_adapter(name)
    state.check("back-to-back loads, forward at once", equal and worst <= 5e-3,  # outputs: kernels may pick other algorithms for other rows
                f"weights equal: {equal}; max rel output diff vs original: {', '.join(detail)}")
    stats = model.adapter_slot_stats()
    out(f"- slot pools: {stats['pools']} pools, {stats['rows']} rows held of {stats['capacity']}, "
        f"{stats['nbytes'] / 2**20:.1f} MiB ({stats['free_nbytes'] / 2**20:.1f} MiB free rows); "
        f"stack cache {model.stack_cache_nbytes() / 2**20:.1f} MiB")
    state.snapshot("adapters")


def _same_weights(model: Any, a: str, b: str) -> bool:
    pa, pb = model.adapter_parameters(a), model.adapter_parameters(b)
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


# -- 7 -----------------------------------------------------------------------------------------------------
def section_placement(state: State) -> None:
    model, s = state.model, state.sizes
    mixed = state.mixed(s.batch)
    run = runner(model, state.inputs())
    case = run(split(mixed, s.batch))
    case()
    state.sync()
    dev = state.device.type
    off = [(n, k) for n in state.all_names() for k, p in model.adapter_named_parameters(n) if p.device.type != dev]
    slots = model.adapters_registry.host.stack_cache.slots
    pools = list(slots._pools.items())
    off_pools = [key for key, pool in pools if pool.data.device.type != dev]
    slot_params = [p for n in state.all_names() for p in model._slot_parameters(n)]
    outside = sum(slots.row_of(p) is None for p in slot_params)
    n_params = sum(len(model.adapter_parameters(n)) for n in state.all_names())
    state.check("adapter parameters on the device", not off,
                f"{n_params - len(off)}/{n_params} on {dev}" + (f"; off: {off[:3]}" if off else ""))
    state.check("slot pool buffers on the device", bool(pools) and not off_pools,
                f"{len(pools) - len(off_pools)}/{len(pools)} pools on {dev}")
    state.check("slot parameters read from their pools", outside == 0,
                f"{len(slot_params) - outside}/{len(slot_params)} resident in a pool row")
    stats = model.adapter_slot_stats()
    table(["slot pools", "value"], [[k, v] for k, v in stats.items()]
          + [["stack cache bytes (stacks built outside the pools)", model.stack_cache_nbytes()]])
    if not state.cuda:
        out("- host syncs: n/a on cpu (tests/core/device_check.py covers them on CPU)")
        return
    case()
    with counting_syncs(state) as sites:
        case()
    state.check("no host sync per layer in a mixed forward", sum(sites.values()) < s.layers,
                f"{sum(sites.values())} syncs in one forward over {len(mixed)} adapters, {s.layers} layers")
    if sites:
        table(["sync call site", "count"], sync_rows(sites))


# -- 3 -----------------------------------------------------------------------------------------------------
def section_forwards(state: State) -> None:
    model, s = state.model, state.sizes
    plain = build_cases(runner(model, state.inputs()), state.names, list(state.names), list(state.names), s.batch,
                        (8, s.batch))

    def synced(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            fn()
            state.sync()
        return run

    times = round_robin({k: synced(v) for k, v in plain.items()}, s.repeats, warmup=2)
    print_ratios(f"mixed forwards: batch {s.batch} x {s.seq}, {state.dtype}, {state.device.type}, "
                 f"{s.repeats} round-robin rounds, synchronised (backbone only, no LM head)", times, s.batch,
                 list(state.names))
    state.snapshot("forwards")


# -- 4 -----------------------------------------------------------------------------------------------------
def run_generator(state: State, blocks: list[str | None], new_tokens: int, count_step: int | None = None
                  ) -> tuple[float, int, dict[int, list[int]], int, Counter[str] | None]:
    """All streams through one Generator until each has `new_tokens` tokens: (seconds, tokens, ids per
    stream, steps, host syncs of step `count_step`)."""
    s, config = state.sizes, state.config
    g = torch.Generator().manual_seed(1)
    prompts = [tuple(torch.randint(3, s.vocab, (s.prompt,), generator=g).tolist()) for _ in blocks]
    greedy = Sampling(temperature=0.0, ignore_eos=True)
    specs = [SeqSpec(i, prompts[i], b, new_tokens, greedy) for i, b in enumerate(blocks)]
    shape = KVShape.of(config, state.dtype)
    limits = Limits(budget_bytes=2 * shape.bytes(len(blocks), s.prompt + new_tokens), max_rows=len(blocks),
                    prefill_chunk=PREFILL_CHUNK)
    gen = Generator(state.model, str(state.tmp / "no_model_files"), state.device, state.dtype)
    tokens: dict[int, list[int]] = {i: [] for i in range(len(blocks))}
    done: set[int] = set()
    admit, steps, syncs = specs, 0, None
    state.sync()
    start = time.perf_counter()
    while len(done) < len(blocks):
        if steps > len(blocks) * (new_tokens + 2) + 100:
            raise RuntimeError(f"generation did not finish after {steps} steps ({len(done)} of {len(blocks)} done)")
        if steps == count_step and state.cuda:
            with counting_syncs(state) as syncs:
                result = gen.step(admit, [], limits)
        else:
            result = gen.step(admit, [], limits)
        admit = []
        steps += 1
        for e in result.events:
            if e.error is not None:
                raise RuntimeError(f"stream {e.id}: {e.error}")
            if e.token is not None:
                tokens[e.id].append(e.token)
            if e.finish is not None:
                done.add(e.id)
    state.sync()
    return time.perf_counter() - start, sum(len(t) for t in tokens.values()), tokens, steps, syncs


def hf_causal_lm(state: State) -> Any:
    """HF's LlamaForCausalLM around the very same backbone (a meta-device shell, its head tied to the input
    embeddings), for `generate` of the bare model."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(state.config)
    lm.model = state.model.base_model
    lm.lm_head.weight = state.model.base_model.get_input_embeddings().weight
    return lm.eval()


def section_generation(state: State) -> None:
    s = state.sizes
    distinct = state.mixed(s.streams)
    blocks: dict[str, list[str | None]] = {
        f"{len(distinct)} distinct adapters": [distinct[i % len(distinct)] for i in range(s.streams)],
        "bare (block None)": [None] * s.streams,
    }
    rows, results = [], {}
    for label, bl in blocks.items():
        run_generator(state, bl, min(4, s.new_tokens))  # warm-up: kernels, prefix caches, allocator
        secs, n, toks, steps, syncs = run_generator(state, bl, s.new_tokens, count_step=min(s.streams // 4 + 8, s.new_tokens // 2 + 1))
        results[label] = (secs, n, toks, syncs)
        rows.append([label, s.streams, n, steps, f"{secs:.2f}", f"{n / secs:.0f}"])
    bare_tps = results["bare (block None)"][1] / results["bare (block None)"][0]
    for row in rows:
        row.append(f"{float(row[-1]) / bare_tps:.3f}")

    hf_tokens = None
    try:
        lm = hf_causal_lm(state)
        g = torch.Generator().manual_seed(1)
        prompts = torch.stack([torch.randint(3, s.vocab, (s.prompt,), generator=g) for _ in range(s.streams)])
        ids = prompts.to(state.device)
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, use_cache=True)
        with torch.inference_mode():
            lm.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
            state.sync()
            start = time.perf_counter()
            gen = lm.generate(ids, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, **kwargs)
            state.sync()
        secs = time.perf_counter() - start
        hf_tokens = gen[:, s.prompt:].tolist()
        n = sum(len(t) for t in hf_tokens)
        rows.append(["HF generate, bare, static batch", s.streams, n, s.new_tokens, f"{secs:.2f}", f"{n / secs:.0f}",
                     f"{n / secs / bare_tps:.3f}"])
    except Exception as e:  # the reference row is optional
        out(f"- HF generate reference failed: {type(e).__name__}: {e}")
    out(f"\ngeneration: {s.streams} streams, {s.prompt}-token prompts, {s.new_tokens} new tokens each, greedy, "
        f"ignore_eos, prefill chunk {PREFILL_CHUNK}, {state.dtype} (time from first admission to last token)")
    table(["case", "streams", "tokens", "steps", "seconds", "tokens/s", "ratio to bare Generator"], rows)
    if hf_tokens is not None:
        mine = results["bare (block None)"][2]
        same = sum(mine[i] == hf_tokens[i] for i in range(s.streams))
        out(f"- bare Generator vs HF generate: {same}/{s.streams} streams with identical greedy tokens (info: "
            "random weights give near-tied logits, and bf16 differs with the batch shape)")
    ad = results[f"{len(distinct)} distinct adapters"][2]
    changed = sum(ad[i] != results["bare (block None)"][2][i] for i in range(s.streams))
    out(f"- adapters change the text: {changed}/{s.streams} streams differ from bare (info only: greedy on random "
        "weights soon repeats one token, so this says little; section 5 gives each adapter's effect)")
    for label, (_, _, _, syncs) in results.items():
        if syncs is not None:
            state.check(f"no host sync per layer in a decode step ({label})", sum(syncs.values()) < s.layers,
                        f"{sum(syncs.values())} syncs in one step, {s.layers} layers")
            if syncs:
                table(["sync call site", "count"], sync_rows(syncs))
    state.snapshot("generation")


# -- 5 -----------------------------------------------------------------------------------------------------
def section_fidelity(state: State) -> None:
    s, model = state.sizes, state.model
    ref, where = build_model(state.config, state.device, torch.float32, seed=0)
    mine = dict(model.base_model.named_parameters())
    with torch.no_grad():
        for key, p in ref.base_model.named_parameters():  # exactly the bf16 model's weights, in float32
            p.copy_(mine[key].float())
    ref.enable_adapter_slots()
    chosen = {m: pool[0] for m, pool in state.names.items()}
    for method, name in chosen.items():  # through the files: bf16 tensors loaded into float32 parameters
        folder = state.tmp / f"fidelity_{method}"
        model.save_adapter(str(folder), name)
        ref.load_adapter(str(folder), load_as=name)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, s.vocab, (s.fidelity_rows, s.fidelity_seq), generator=g).to(state.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    setups: dict[str, Any] = {"bare backbone": None, **{m: n for m, n in chosen.items()},
                              f"BatchSplit of {len(chosen)}": split(list(chosen.values()), s.fidelity_rows)}

    def outputs(m: Any, setup: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), AdapterSetup(setup):
            hidden = m(**inputs).last_hidden_state
            logits = hidden @ m.base_model.get_input_embeddings().weight.T  # as the Generator's head
        return hidden.float(), logits.float()

    bare32 = outputs(ref, None)
    rows, worst = [], 0.0
    for label, setup in setups.items():
        h16, l16 = outputs(model, setup)
        h32, l32 = outputs(ref, setup)
        rel_h = float((h16 - h32).abs().max() / h32.abs().max())
        rel_l = float((l16 - l32).abs().max() / l32.abs().max())
        effect = float((h32 - bare32[0]).abs().max() / h32.abs().max())
        agree = float((l16.argmax(-1) == l32.argmax(-1)).float().mean())
        worst = max(worst, rel_h, rel_l)
        ok = rel_h <= TOLERANCE and rel_l <= TOLERANCE
        rows.append([label, f"{rel_h:.2e}", f"{rel_l:.2e}", f"{effect:.2e}", f"{agree:.3f}", "PASS" if ok else "FAIL"])
    out(f"\nbf16 vs float32 (float32 copy {where}, same weights; {s.fidelity_rows} rows x {s.fidelity_seq} tokens; "
        f"relative = max abs diff / max abs of the float32 tensor; tolerance {TOLERANCE:g})")
    table(["setup", "hidden rel diff", "logits rel diff", "adapter effect on hidden (fp32, rel to bare)",
           "top-1 agreement", "verdict"], rows)
    state.check("bf16 within tolerance of float32", worst <= TOLERANCE, f"worst relative diff {worst:.2e} <= {TOLERANCE:g}")
    state.snapshot("float32 copy")
    del ref
    if state.cuda:
        torch.cuda.empty_cache()


# -- 6 -----------------------------------------------------------------------------------------------------
def section_memory(state: State) -> None:
    if not state.cuda:
        out("- n/a on cpu (torch.cuda memory counters only)")
        return
    state.snapshot("end")
    table(["point", "allocated MiB", "peak MiB since previous point", "reserved MiB"],
          [[label, f"{a:.0f}", f"{p:.0f}", f"{r:.0f}"] for label, a, p, r in state.memory])


RUNS: dict[int, Callable[[State], None]] = {
    1: section_backbone, 2: section_adapters, 7: section_placement, 3: section_forwards, 4: section_generation,
    5: section_fidelity, 6: section_memory,
}
NEEDS_ADAPTERS = frozenset({7, 3, 4, 5})


def run_section(state: State, number: int) -> None:
    out(f"\n## {number}. {SECTIONS[number]}")
    if state.elapsed() > state.args.budget_s:
        out(f"- skipped: {state.elapsed():.0f} s elapsed, past --budget-s {state.args.budget_s:g}")
        return
    if number != 1 and state.model is None:
        out("- skipped: no backbone (section 1 failed)")
        return
    if number in NEEDS_ADAPTERS and not state.names:
        out("- skipped: no adapters (section 2 failed)")
        return
    start = time.perf_counter()
    try:
        RUNS[number](state)
    except Exception:  # print it and go on with the next section
        state.failed.append(number)
        out("- **section failed**:", "```", traceback.format_exc().rstrip(), "```")
        if state.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(state.device)
                torch.cuda.empty_cache()
    out(f"- section {number} took {time.perf_counter() - start:.1f} s (total {state.elapsed():.0f} s)")


def header(state: State, argv: list[str]) -> str:
    if state.cuda:
        name = torch.cuda.get_device_name(state.device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    import transformers

    command = " ".join(["python bench/gpu_check.py", *argv])
    return (f"# gpu_check: {datetime.datetime.now().isoformat(timespec='seconds')} | torch {torch.__version__} "
            f"(cuda {torch.version.cuda}) | transformers {transformers.__version__} | device {name} | "
            f"command `{command}`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for the smoke")
    parser.add_argument("--small", action="store_true", help="tiny sizes (hidden 64, 2 layers, 8 adapters): the CPU smoke")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new section after this many seconds")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--adapters", type=int, default=None, help="override the number of adapters")
    parser.add_argument("--repeats", type=int, default=None, help="override the round-robin rounds of section 3")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    sizes = SMALL if args.small else FULL
    overrides = {k: v for k, v in (("adapters", args.adapters), ("repeats", args.repeats)) if v is not None}
    if overrides:
        sizes = Sizes(**{**sizes.__dict__, **overrides})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        out("# gpu_check: no CUDA device here (torch.cuda.is_available() is False); run with --device cpu --small")
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        state = State(args, sizes, device, getattr(torch, args.dtype), Path(tmp))
        out(header(state, argv))
        out(f"sections run in the order {', '.join(map(str, RUNS))} (7 is cheap and important, so it runs early); "
            f"budget {args.budget_s:g} s")
        for number in RUNS:
            run_section(state, number)
    out("\n## summary")
    table(["check", "verdict", "detail"], [list(c) for c in state.checks], right=3)
    failed_checks = [c for c in state.checks if c[1] != "PASS"]
    skipped = state.elapsed() > args.budget_s
    out(f"- sections failed: {state.failed or 'none'}; checks failed: {len(failed_checks)}; "
        f"total {state.elapsed():.0f} s" + ("; the budget ran out" if skipped else ""))
    return 1 if state.failed or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
