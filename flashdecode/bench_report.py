"""The benchmark behind `make bench`: `python -m flashdecode.bench_report [--quick] [--out DIR] [--threads N]`.

Hand-written, not exported from the book: this is the harness (torch's variants, the table, the CSV, the plot,
the command line), which teaches nothing. What it measures and how — the scenarios, cold-cache timing in
rotation, the read roof — is flashdecode.bench, born in book/06_to_the_roof.ipynb with the argument and this
machine's results.
"""

import argparse
import csv
import gc
import os
import sys
import time
import tracemalloc

import numpy as np

from flashdecode.api import batched_flash_attention, flash_attention_forward, get_num_threads
from flashdecode.batching import KvCache, batched_reference
from flashdecode.bench import (
    ROOF_BYTES,
    CacheFlusher,
    Scenario,
    make_inputs,
    rel_err,
    scenarios,
    threaded,
    time_interleaved,
)
from flashdecode.paged import PagedKvCache
from flashdecode.storage import bytes_per_token


def torch_variants(q, cache, lengths, num_threads):
    """torch CPU scaled_dot_product_attention, prepared in torch's own layout (B, Hkv, L, D) outside the
    timing: `padded` (one call on the batch padded to the longest slot, with a mask when ragged) and
    `per-slot` (one call per slot on its own length). None when torch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.set_num_threads(num_threads)
    longest = max(lengths)
    k = torch.from_numpy(np.ascontiguousarray(cache.keys[:, :longest].transpose(0, 2, 1, 3)))
    v = torch.from_numpy(np.ascontiguousarray(cache.values[:, :longest].transpose(0, 2, 1, 3)))
    qt = torch.from_numpy(q).unsqueeze(2)  # (B, H, 1, D)
    ragged = min(lengths) != longest
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :] if ragged else None

    def padded():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]

    def per_slot():
        with torch.inference_mode():
            return torch.cat(
                [
                    F.scaled_dot_product_attention(
                        qt[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], enable_gqa=True
                    )[:, :, 0]
                    for b, n in enumerate(lengths)
                ]
            )

    return {"padded": padded, "per-slot": per_slot}


def torch_version():
    try:
        import torch

        return torch.__version__
    except ImportError:
        return None


def run_scenario(scenario, num_threads, quick, flush, progress, roof_data):
    """Time one scenario with every method, the roof in the same rotation; returns one result row (a dict)."""
    q, cache = make_inputs(scenario)
    view = cache.view(range(len(scenario.lengths)))
    fast_reps, slow_reps = (5, 1) if quick else (11, 3)
    row = {
        "scenario": scenario.name,
        "shape": scenario.shape,
        "kv_mib": scenario.kv_bytes / 2**20,
        "threads": num_threads,
    }

    def step(label):
        print(f"  {scenario.name}: {label}", file=progress, flush=True)

    step("checking every method against the float64 reference")
    ref = batched_reference(q, view)[0]
    methods = {
        name: (lambda name=name: batched_flash_attention(q, view, backend=name, num_threads=num_threads))
        for name in ("simd", "cython")
    }
    variants = torch_variants(q, cache, scenario.lengths, num_threads) or {}
    for name, fn in variants.items():
        methods[f"torch_{name}"] = lambda fn=fn: fn().numpy()
    for name, fn in methods.items():
        row[f"err_{name}"] = rel_err(fn(), ref)
        assert row[f"err_{name}"] < 1e-4, (scenario.name, name, row[f"err_{name}"])
    row["err"] = row["err_simd"]
    roof = threaded([part.sum for part in np.array_split(roof_data, num_threads)])
    step(f"timing {', '.join(methods)} and the roof in rotation, {fast_reps} rounds")
    timed = time_interleaved({**methods, "roof": roof}, fast_reps, flush)
    row["roof_gbs"] = roof_data.nbytes / min(timed.pop("roof")[1]) / 1e9  # best of the rounds
    row["flashdecode_s"], row["cython_s"] = timed["simd"][0], timed["cython"][0]
    for name in variants:
        row[f"torch_{name}_s"] = timed[f"torch_{name}"][0]
    step(f"timing numpy naive (float64 reference) and numpy backend, {slow_reps} round(s)")
    slow = time_interleaved(
        {
            "naive": lambda: batched_reference(q, view),
            "numpy": lambda: batched_flash_attention(q, view, backend="numpy"),
        },
        slow_reps,
        flush,
    )
    row["naive_s"], row["numpy_s"] = slow["naive"][0], slow["numpy"][0]
    if variants:
        best = min(variants, key=lambda name: row[f"torch_{name}_s"])
        row["torch_s"], row["torch_best"] = row[f"torch_{best}_s"], best
    row["flashdecode_gbs"] = scenario.kv_bytes / row["flashdecode_s"] / 1e9
    row["roof_frac"] = row["flashdecode_gbs"] / row["roof_gbs"]
    row["cython_roof_frac"] = scenario.kv_bytes / row["cython_s"] / 1e9 / row["roof_gbs"]
    row["x_cython"] = row["cython_s"] / row["flashdecode_s"]
    row["x_naive"] = row["naive_s"] / row["flashdecode_s"]
    row["x_numpy"] = row["numpy_s"] / row["flashdecode_s"]
    if "torch_s" in row:
        row["torch_gbs"] = scenario.kv_bytes / row["torch_s"] / 1e9
        row["x_torch"] = row["torch_s"] / row["flashdecode_s"]
    return row


def memory_per_call(lengths=(4096, 65536), num_heads=8, num_kv_heads=1, head_dim=128, num_threads=None):
    """Extra memory of one call, for one request at each cache length: Python allocations at their peak
    (tracemalloc) and the process's peak resident set growth (Linux: VmHWM after clearing it)."""
    rows = []
    for n in lengths:
        q, cache = make_inputs(Scenario("mem", [n], num_heads, num_kv_heads, head_dim))
        view = cache.view([0])
        batched_flash_attention(q, view, num_threads=num_threads)  # warm up: code, thread pool
        gc.collect()
        rss_peak = None
        try:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            rss_before = _status_kib("VmRSS")
            tracemalloc.start()
            batched_flash_attention(q, view, num_threads=num_threads)
            traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            rss_peak = max(0, _status_kib("VmHWM") - rss_before)
        except OSError:
            tracemalloc.start()
            batched_flash_attention(q, view, num_threads=num_threads)
            traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        rows.append(
            {
                "tokens": n,
                "cache_kib": (cache.keys.nbytes + cache.values.nbytes) / 1024,
                "traced_kib": traced_peak / 1024,
                "rss_kib": rss_peak,
            }
        )
        del q, cache, view
        gc.collect()
    return rows


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def python_threads_overlap(num_slots=8, length=4096, calls=10, rounds=3):
    """(serial s, two-thread s): 2 x `calls` single-threaded decode steps, one Python thread vs two at once."""
    q, cache = make_inputs(Scenario("threads", [length] * num_slots, 8, 8))
    cache.keys.flags.writeable = cache.values.flags.writeable = False  # shared, read-only
    view = cache.view(range(num_slots))

    def work():
        for _ in range(calls):
            batched_flash_attention(q, view, num_threads=1)

    work()  # warm up
    serial, together = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        work()
        serial.append(time.perf_counter() - start)
        start = time.perf_counter()
        threaded([work, work])()
        together.append(time.perf_counter() - start)
    return min(serial), min(together)


COLUMNS = [
    ("scenario", "{:<8}"),
    ("shape", "{:<34}"),
    ("kv_mib", "{:>7.0f}"),
    ("cython_s", "{:>8.2f}"),
    ("cython_roof_frac", "{:>5.0%}"),
    ("flashdecode_s", "{:>8.2f}"),
    ("flashdecode_gbs", "{:>6.2f}"),
    ("roof_gbs", "{:>5.1f}"),
    ("roof_frac", "{:>5.0%}"),
    ("x_cython", "{:>5.1f}x"),
    ("x_naive", "{:>6.0f}x"),
    ("x_numpy", "{:>5.0f}x"),
    ("torch_s", "{:>8.2f}"),
    ("torch_best", "{:<8}"),
    ("x_torch", "{:>5.1f}x"),
]
HEADERS = {
    "scenario": "scenario",
    "shape": "shape",
    "kv_mib": "KV MiB",
    "cython_s": "cython ms",
    "cython_roof_frac": "%roof",
    "x_cython": "vs cy",
    "flashdecode_s": "simd ms",
    "flashdecode_gbs": "GB/s",
    "roof_gbs": "roof",
    "roof_frac": "%roof",
    "x_naive": "vs naive",
    "x_numpy": "vs np",
    "torch_s": "torch ms",
    "torch_best": "torch",
    "x_torch": "vs torch",
}


def format_table(rows):
    """The results as a fixed-width text table (times in ms, GB/s = KV bytes read / time)."""
    widths = {}
    lines = []
    cells = []
    for row in rows:
        line = []
        for key, fmt in COLUMNS:
            value = row.get(key)
            if value is None:
                text = "-"
            elif key.endswith("_s"):
                text = fmt.format(value * 1e3)
            else:
                text = fmt.format(value)
            line.append(text)
        cells.append(line)
    for i, (key, _) in enumerate(COLUMNS):
        widths[key] = max(len(HEADERS[key]), *(len(line[i]) for line in cells)) if cells else len(HEADERS[key])
    lines.append("  ".join(HEADERS[key].rjust(widths[key]) for key, _ in COLUMNS))
    for line in cells:
        lines.append("  ".join(text.rjust(widths[key]) for (key, _), text in zip(COLUMNS, line)))
    return "\n".join(lines)


def save_csv(rows, path):
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path=None):
    """Bars of effective GB/s per scenario (flashdecode, torch's better SDPA, the numpy backend) under
    each scenario's measured roof. Returns the matplotlib figure (saved to `path` when given)."""
    import matplotlib

    if path is not None and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["scenario"] for row in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    series = [
        ("flashdecode, SIMD tile kernels", [row["flashdecode_gbs"] for row in rows], "tab:blue"),
        ("flashdecode, plain Cython", [row["kv_mib"] * 2**20 / row["cython_s"] / 1e9 for row in rows], "tab:cyan"),
    ]
    if any("torch_gbs" in row for row in rows):
        series.append(("torch SDPA (better variant)", [row.get("torch_gbs", 0) for row in rows], "tab:orange"))
    series.append(("numpy backend", [row["kv_mib"] * 2**20 / row["numpy_s"] / 1e9 for row in rows], "tab:gray"))
    width = 0.8 / len(series)
    for i, (label, values, color) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label, color=color)
    for i, row in enumerate(rows):
        ax.plot(
            [i - 0.45, i + 0.45],
            [row["roof_gbs"]] * 2,
            color="black",
            lw=1.5,
            label="read roof (numpy sum)" if i == 0 else None,
        )
    ax.set_xticks(x, names)
    ax.set_ylabel("effective GB/s (KV bytes / time)")
    ax.set_title(f"decode attention, {rows[0]['threads']} threads")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)  # below: the bars reach the roof
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def chosen_scenarios(quick, names):
    """The scenarios to run: all, or those named."""
    return [s for s in scenarios(quick) if not names or s.name in names]


def run(quick=False, num_threads=None, names=None, progress=sys.stderr, flush=None, roof_data=None):
    """Run the scenarios (all, or those named) and return their result rows. flush and roof_data: the cache
    flusher and the roof's array, made here unless the caller shares its own."""
    num_threads = num_threads or get_num_threads()
    chosen = chosen_scenarios(quick, names)
    flush = flush or CacheFlusher()
    roof_data = np.ones(ROOF_BYTES // 4, np.float32) if roof_data is None else roof_data
    rows = []
    for i, scenario in enumerate(chosen, 1):
        print(
            f"[{i}/{len(chosen)}] {scenario.name}: {scenario.shape} ({scenario.kv_bytes / 2**20:.0f} MiB of KV)",
            file=progress,
            flush=True,
        )
        rows.append(run_scenario(scenario, num_threads, quick, flush, progress, roof_data))
    return rows


def paged_against_contiguous(scenario, num_threads, flush, block_size=16, repeats=7):
    """The same batch as a KvCache and as a PagedKvCache (blocks of `block_size`), timed in rotation.
    Returns (contiguous s, paged s)."""
    q, cache = make_inputs(scenario)
    pool = PagedKvCache(
        sum(-(-n // block_size) for n in scenario.lengths), block_size, scenario.num_kv_heads, scenario.head_dim
    )
    seqs = [pool.new_sequence() for _ in scenario.lengths]
    for slot, (seq, n) in enumerate(zip(seqs, scenario.lengths)):
        pool.append(seq, cache.keys[slot, :n], cache.values[slot, :n])
    contiguous, paged = cache.view(range(len(seqs))), pool.view(seqs)
    assert rel_err(batched_flash_attention(q, paged), batched_flash_attention(q, contiguous)) < 1e-5
    timed = time_interleaved(
        {
            "contiguous": lambda: batched_flash_attention(q, contiguous, num_threads=num_threads),
            "paged": lambda: batched_flash_attention(q, paged, num_threads=num_threads),
        },
        repeats,
        flush,
    )
    return timed["contiguous"][0], timed["paged"][0]


STORAGE_FORMATS = ("float32", "float16", "bfloat16", "int8")


def against_best_roof(rows, formats):
    """Every fraction of the roof, in both tables, against the best read rate measured anywhere in the run,
    which becomes every row's roof. The roof is the machine's, so any one rotation's measurement can only fall
    short of it: one whose sums all met a busy moment once put a kernel at 113% of "its" roof."""
    roof = max(row["roof_gbs"] for row in rows + formats)
    for row in rows:
        row["roof_gbs"], row["roof_frac"] = roof, row["flashdecode_gbs"] / roof
        row["cython_roof_frac"] = row["kv_mib"] * 2**20 / row["cython_s"] / 1e9 / roof
    for row in formats:
        row["roof_gbs"], row["roof_frac"] = roof, row["read_gbs"] / roof
    return roof


def storage_formats(scenario, num_threads, flush, roof_data, repeats=7):
    """The scenario's batch from a cache of each storage format, in rotation with the roof. Returns a row per
    format: time, tokens/s, speed-up over float32, and the bytes actually read (values and int8 scales) / time,
    also as a fraction of this rotation's roof (against_best_roof puts the run's best in its place)."""
    q, source = make_inputs(scenario)
    num_slots = len(scenario.lengths)
    methods, caches = {}, {}
    for format in STORAGE_FORMATS:
        cache = caches[format] = KvCache(
            num_slots, max(scenario.lengths), scenario.num_kv_heads, scenario.head_dim, dtype=format
        )
        for slot, n in enumerate(scenario.lengths):
            cache.append(slot, source.keys[slot, :n], source.values[slot, :n])
        methods[format] = lambda cache=cache: batched_flash_attention(
            q, cache.view(range(num_slots)), num_threads=num_threads
        )
    del source
    methods["roof"] = threaded([part.sum for part in np.array_split(roof_data, num_threads)])
    timed = time_interleaved(methods, repeats, flush)
    roof = roof_data.nbytes / min(timed.pop("roof")[1])
    tokens = int(np.sum(scenario.lengths))
    rows = []
    for format, (seconds, _) in timed.items():
        read = tokens * bytes_per_token(1, scenario.num_kv_heads, scenario.head_dim, format)
        rows.append(
            {
                "scenario": scenario.name,
                "format": format,
                "ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                "speedup": timed["float32"][0] / seconds,
                "read_gbs": read / seconds / 1e9,
                "roof_frac": read / seconds / roof,
                "roof_gbs": roof / 1e9,
            }
        )
    return rows


def window_against_short_cache(num_threads, flush, length=65536, window_left=256, repeats=7):
    """One MQA decode step over a `length`-token cache with and without a window, and over a cache as short as
    the window, timed in rotation. Returns {label: s}."""
    q, cache = make_inputs(Scenario("window", [length], 8, 1))
    keys, values = cache.keys[0, :length], cache.values[0, :length]
    short_keys, short_values = keys[-window_left - 1 :].copy(), values[-window_left - 1 :].copy()
    methods = {
        f"{length} tokens, window_left={window_left}": lambda: flash_attention_forward(
            q, keys, values, window_left=window_left, num_threads=num_threads
        ),
        f"{window_left + 1} tokens": lambda: flash_attention_forward(
            q, short_keys, short_values, num_threads=num_threads
        ),
        f"{length} tokens, no window": lambda: flash_attention_forward(q, keys, values, num_threads=num_threads),
    }
    return {label: median for label, (median, _) in time_interleaved(methods, repeats, flush).items()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m flashdecode.bench_report", description="flashdecode decode-attention benchmark"
    )
    parser.add_argument("--quick", action="store_true", help="caches a quarter the size, fewer repeats")
    parser.add_argument("--out", default="bench-results", help="directory for results.csv and results.png")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: get_num_threads())")
    parser.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    threads = args.threads or get_num_threads()
    version = torch_version()
    print(
        f"flashdecode bench: {threads} threads, {'quick' if args.quick else 'full'} run, "
        f"torch {version if version else 'not installed (pip install torch==2.13.0; make bench does)'}",
        file=sys.stderr,
    )
    flush, roof_data = CacheFlusher(), np.ones(ROOF_BYTES // 4, np.float32)  # one of each for the whole run
    rows = run(args.quick, threads, args.scenario, flush=flush, roof_data=roof_data)
    print("memory per call ...", file=sys.stderr, flush=True)
    memory = memory_per_call(num_threads=threads)
    print("paged against contiguous, and a window over a long cache ...", file=sys.stderr, flush=True)
    paged = {
        s.name: paged_against_contiguous(s, threads, flush)
        for s in scenarios(args.quick)
        if s.name in ("uniform", "ragged")
    }
    window = window_against_short_cache(threads, flush, length=65536 // (4 if args.quick else 1))
    formats = []
    for s in chosen_scenarios(args.quick, args.scenario):
        print(f"storage formats: {s.name} ...", file=sys.stderr, flush=True)
        formats += storage_formats(s, threads, flush, roof_data)
    print("two Python threads ...", file=sys.stderr, flush=True)
    serial, together = python_threads_overlap()
    against_best_roof(rows, formats)
    os.makedirs(args.out, exist_ok=True)
    save_csv(rows, os.path.join(args.out, "results.csv"))
    try:
        plot(rows, os.path.join(args.out, "results.png"))
        saved = "results.csv, results.png"
    except ImportError:
        saved = "results.csv (no matplotlib: no plot)"
    print(format_table(rows))
    print(
        "cython ms / simd ms / torch ms: median wall time of one decode step with the plain and the SIMD tile "
        f"kernels ({threads} threads, cold cache); GB/s: KV bytes read / time; roof: numpy sum over 256 MiB on 1 and "
        "on N threads, timed in rotation with the kernels, the best rate of all the run's rounds; "
        "vs X: X's time / the SIMD kernel's (the default); torch: the better of its padded and per-slot SDPA "
        f"({'torch ' + version if version else 'torch not installed'})."
    )
    for m in memory:
        rss = "n/a" if m["rss_kib"] is None else f"{m['rss_kib']:.0f} KiB"
        print(
            f"extra memory per call, {m['tokens']:>6} tokens ({m['cache_kib'] / 1024:.0f} MiB cache): "
            f"traced peak {m['traced_kib']:.0f} KiB, peak RSS growth {rss}"
        )
    for name, (contiguous, paged_s) in paged.items():
        print(
            f"paged (blocks of 16) against contiguous, {name}: {contiguous * 1e3:.2f} ms contiguous, "
            f"{paged_s * 1e3:.2f} ms paged: paged runs at {contiguous / paged_s:.0%} of the contiguous speed"
        )
    print(
        "sliding window, one MQA decode step (H=8/1 D=128): "
        + ", ".join(f"{label} {seconds * 1e3:.3f} ms" for label, seconds in window.items())
    )
    print(
        "storage formats (the same batch from a cache of each format; of the roof: bytes actually read / time, "
        "against the same roof):"
    )
    for row in formats:
        print(
            f"  {row['scenario']:8} {row['format']:9} {row['ms']:8.2f} ms  "
            f"{row['tokens_per_s'] / 1e6:7.2f} M tokens/s  "
            f"{row['speedup']:5.2f}x float32  {row['roof_frac']:5.0%} of the roof"
        )
    print(
        f"two Python threads, each running 10 single-threaded decode steps (B=8 H=8/8 D=128 L=4096): "
        f"{serial * 1e3:.0f} ms one after the other, {together * 1e3:.0f} ms at once: {serial / together:.2f}x overlap"
    )
    print(f"saved {saved} in {args.out}/", file=sys.stderr)
    return rows, memory


if __name__ == "__main__":
    main()
