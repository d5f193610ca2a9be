"""Shared by the benchmark scripts: the machine's description and writing a table into its own
section of docs/benchmarks.md (between markers, so re-runs replace it)."""

import json
import os
import platform
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vector_width(flags: set[str]) -> str:
    """The widest vector unit the kernels are built for (the same "AMD EPYC" name has covered
    Zen 3 with AVX2 and Zen 4 with AVX-512 here, and they differ several-fold in speed)."""
    if "avx512f" in flags:
        return "AVX-512" + (" + AVX512-BF16" if "avx512_bf16" in flags else "")
    return "AVX2" if "avx2" in flags else "no AVX2"


def machine() -> str:
    cpu, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        flags = set(next(ln for ln in lines if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    width = f" ({vector_width(flags)})" if flags else ""
    return f"{cpu}{width}, {len(os.sched_getaffinity(0))} cores, {platform.system()} {platform.release()}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def record(key: str, title: str, table: str, note: str, data: dict, write: bool = True) -> None:
    """Write benchmarks/results/<key>.json and replace the <key> section of docs/benchmarks.md;
    write=False (a script's --no-docs) writes neither, so a trial run leaves the recorded results
    alone."""
    if not write:
        return
    meta = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", f"{key}.json"), "w") as f:
        json.dump({"meta": meta, **data}, f, indent=1)
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nEach section is written by the script it names; re-running the script replaces it.\n"
    block = f"{begin}\n## {title}\n\nMachine: {meta['machine']}. Run {meta['date']} UTC.\n\n{table}\n{note}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
