"""Load the STS benchmark and the distillation corpus, check them, and write them as small files.

Sources: a local folder (``stsb.tsv.gz`` as described in ../shared/data/README.md, or sentence-transformers'
original ``stsbenchmark.tsv.gz`` layout; ``wiki_en_sentences.tsv.gz`` or ``wikipedia-en-sentences.txt.gz``)
or the Hugging Face Hub via ``datasets``. Scores are normalized to 0..1.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import shutil
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task

from tasks.config import DataConfig

log = logging.getLogger(__name__)

STSB_FILES = ("stsb.tsv.gz", "stsbenchmark.tsv.gz")
WIKI_FILES = ("wiki_en_sentences.tsv.gz", "wikipedia-en-sentences.txt.gz")
SPLITS = ("train", "dev", "test")
_HUB_SPLIT = {"train": "train", "dev": "validation", "test": "test"}
MIN_SUITE_PAIRS = 10  # a held-out suite with fewer clean pairs is dropped


class DataError(ValueError):
    """Input data that is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class StsPairs:
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]  # 0..1

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class PreparedData:
    """Paths of the prepared data files (passed between tasks instead of the data itself)."""

    root: Path
    fingerprint: str
    corpus_size: int
    heldout_size: int
    sts_pairs: dict[str, int]

    @property
    def corpus_file(self) -> Path:
        return self.root / "corpus.txt"

    @property
    def heldout_file(self) -> Path:
        return self.root / "heldout.txt"

    heldout_suites: dict[str, int] = field(default_factory=dict)  # suite -> pairs scored
    # suite -> {"total", "contaminated", "clean", "scored"} pair counts (see decontaminate_suites)
    heldout_suite_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def sts_file(self, split: str) -> Path:
        return self.root / f"stsb-{split}.jsonl"

    def suite_file(self, name: str) -> Path:
        return self.root / f"heldout-{name}.jsonl"


# --- reading -------------------------------------------------------------------------------------------


def read_stsb(config: DataConfig) -> dict[str, StsPairs]:
    """All three STS-B splits, scores normalized to 0..1."""
    if config.source == "hub":
        return {split: _read_stsb_hub(split) for split in SPLITS}
    path = find_file(config.data_dir, STSB_FILES, "STS benchmark")
    return _read_stsb_tsv(path)


def _read_stsb_tsv(path: Path) -> dict[str, StsPairs]:
    rows: dict[str, tuple[list[str], list[str], list[float]]] = {s: ([], [], []) for s in SPLITS}
    layout = "the stsb.tsv.gz layout (split ... score sentence1 sentence2) described in shared/data/README.md"
    for line_no, row in read_tsv(path, ("split", "score", "sentence1", "sentence2"), layout):
        split = {"validation": "dev"}.get(row["split"], row["split"])
        if split not in rows:
            raise DataError(
                f"{path}: line {line_no}: unknown split {row['split']!r}; use train/dev/test (or validation)"
            )
        score = _parse_score(row["score"], path, line_no)
        s1, s2, scores = rows[split]
        s1.append(_sentence(row, "sentence1", path, line_no))
        s2.append(_sentence(row, "sentence2", path, line_no))
        scores.append(score)
    empty = [s for s, (_, _, sc) in rows.items() if not sc]
    if empty:
        raise DataError(f"{path}: split(s) {empty} have no rows; the file must hold train, dev and test")
    return {split: StsPairs(*cols) for split, cols in rows.items()}


def _sentence(row: dict[str, str], column: str, path: Path, line_no: int) -> str:
    sentence = row[column].strip()
    if not sentence:
        raise DataError(f"{path}: line {line_no}: {column} is empty; fix or remove that row")
    return sentence


def _parse_score(raw: str | None, path: Path, line_no: int) -> float:
    try:
        score = float(raw or "")
    except ValueError:
        raise DataError(
            f"{path}: line {line_no}: score {raw!r} is not a number; fix or remove that row"
        ) from None
    if not 0.0 <= score <= 5.0:
        raise DataError(f"{path}: line {line_no}: score {score} is outside 0..5; fix or remove that row")
    return score / 5.0


def read_tsv(path: Path, required: tuple[str, ...], layout: str) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a tab-separated file with a header (gzip when named ``.gz``), streamed.

    No quoting (as shared/data/README.md says); blank lines are skipped. Every way the file can be unreadable
    becomes a ``DataError`` naming the file, the line and the fix: not gzip, a truncated or corrupt gzip
    stream, a line that is not UTF-8, an empty file, a header without the ``required`` columns, a row with
    fewer or more fields than the header.
    """
    lines = _text_lines(path)
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path}: the file is empty; expected a header line and rows in {layout}")
    header = first[1].rstrip("\r\n").split("\t")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: line 1: header {header} lacks columns {missing}; expected {layout}")
    for line_no, line in lines:
        fields = line.rstrip("\r\n").split("\t")
        if fields == [""]:
            continue
        if len(fields) != len(header):
            raise DataError(
                f"{path}: line {line_no}: {len(fields)} tab-separated fields where the header has "
                f"{len(header)} ({', '.join(header)}); fix or remove that row"
            )
        yield line_no, dict(zip(header, fields, strict=True))


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file (gunzipped when named ``.gz``), each line decoded as UTF-8."""
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}: line {line_no}: the text is not UTF-8 ({exc.reason} at byte "
                        f"{exc.start + 1} of the line); re-encode the file as UTF-8 or fix that line"
                    ) from None
                yield line_no, text
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(_unreadable(path, exc, line_no)) from None


def _unreadable(path: Path, exc: BaseException, line_no: int) -> str:
    """What is wrong with a file that cannot be read to its end (``line_no`` lines were read), and the fix."""
    where = f"after line {line_no}" if line_no else "at the start"
    replace = "replace it with an intact copy (shared/data/README.md lists the sha256 of each file)"
    if isinstance(exc, gzip.BadGzipFile) and not line_no:
        return f"{path}: is not a gzip file ({exc}); {replace}, or gzip the plain text file"
    if isinstance(exc, EOFError):
        return f"{path}: the gzip data ends early, {where} (the file is truncated); {replace}"
    if isinstance(exc, gzip.BadGzipFile | zlib.error):
        return f"{path}: the gzip data is corrupt {where} ({exc}); {replace}"
    return f"{path}: cannot be read ({type(exc).__name__}: {exc}); check the file and its permissions"


def _read_stsb_hub(split: str) -> StsPairs:
    from datasets import load_dataset

    ds = load_dataset("sentence-transformers/stsb", split=_HUB_SPLIT[split])
    return StsPairs(list(ds["sentence1"]), list(ds["sentence2"]), [float(s) for s in ds["score"]])


def iter_wiki_sentences(config: DataConfig) -> Iterator[str]:
    """Wikipedia sentences in file order (the shared file is already shuffled); blank ones are skipped."""
    if config.source == "hub":
        from datasets import load_dataset

        ds = load_dataset("sentence-transformers/wikipedia-en-sentences", split="train", streaming=True)
        for row in ds:
            yield row["sentence"].strip()
        return
    path = wiki_file(config)
    if path.name.endswith(".tsv.gz"):
        for _, row in read_tsv(path, ("sentence",), "'curid<TAB>sentence' columns"):
            if row["sentence"].strip():
                yield row["sentence"].strip()
        return
    yield from _read_lines_gz(path)


def _read_lines_gz(path: Path) -> Iterator[str]:
    """Non-blank lines of a gzipped text file (one sentence a line), stripped."""
    for _, line in _text_lines(path):
        if line.strip():
            yield line.strip()


def wiki_file(config: DataConfig) -> Path:
    """The local Wikipedia sentence file."""
    return find_file(config.data_dir, WIKI_FILES, "Wikipedia sentence corpus")


def find_file(data_dir: Path | None, names: tuple[str, ...], what: str) -> Path:
    if data_dir is None or not Path(data_dir).is_dir():
        raise DataError(
            f"data.data_dir={data_dir} is not a folder: point it (or DISTILL_DATA_DIR) at the folder "
            f"holding {' or '.join(names)}"
        )
    for name in names:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise DataError(
        f"data.data_dir={data_dir} has no {what} file: expected one of {list(names)} there "
        f"(see shared/data/README.md for the format)"
    )


def read_heldout_suites(config: DataConfig) -> dict[str, StsPairs]:
    """Extra STS-style evaluation sets, one per ``dataset`` value (or file stem), every pair in file order."""
    suites: dict[str, StsPairs] = {}
    for entry in config.heldout_suites:
        path = Path(entry) if Path(entry).is_absolute() else Path(config.data_dir or ".") / entry
        if not path.is_file():
            raise DataError(
                f"data.heldout_suites: {path} does not exist; remove it from the list "
                f"(e.g. --set data.heldout_suites=[]) or fix the path"
            )
        rows: dict[str, list[tuple[str, str, float]]] = {}
        stem = path.name.split(".")[0]
        layout = "an STS file with score, sentence1 and sentence2 columns (like sts12-16.tsv.gz)"
        for line_no, row in read_tsv(path, ("score", "sentence1", "sentence2"), layout):
            name = (row.get("dataset") or stem).lower()
            score = _parse_score(row["score"], path, line_no)
            pair = (_sentence(row, "sentence1", path, line_no), _sentence(row, "sentence2", path, line_no))
            rows.setdefault(name, []).append((*pair, score))
        if not rows:
            raise DataError(
                f"{path}: has a header but no rows; add scored pairs or remove it from data.heldout_suites"
            )
        for name, pairs in rows.items():
            suites[name] = StsPairs([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs])
    return suites


def decontaminate_suites(
    suites: dict[str, StsPairs], seen: list[StsPairs], corpus: list[str], max_pairs: int | None
) -> tuple[dict[str, StsPairs], dict[str, dict[str, int]]]:
    """Drop every suite pair that training or model selection saw, then sample up to ``max_pairs``.

    A pair is contaminated when it is a ``seen`` pair (STS-B train or dev, either order) or either of its
    sentences is a ``seen`` or ``corpus`` sentence. A suite left with fewer than ``MIN_SUITE_PAIRS`` clean
    pairs is dropped. Returns the clean suites and, per suite, the pair counts total / contaminated / clean
    / scored.
    """
    seen_pairs = {
        pair
        for p in seen
        for a, b in zip(p.sentences1, p.sentences2, strict=True)
        for pair in ((a, b), (b, a))
    }
    seen_sentences = {s for p in seen for s in p.sentences1 + p.sentences2}.union(corpus)
    kept: dict[str, StsPairs] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, pairs in suites.items():
        clean = [
            (a, b, score)
            for a, b, score in zip(pairs.sentences1, pairs.sentences2, pairs.scores, strict=True)
            if (a, b) not in seen_pairs and a not in seen_sentences and b not in seen_sentences
        ]
        counts[name] = {"total": len(pairs), "contaminated": len(pairs) - len(clean), "clean": len(clean)}
        if len(clean) < MIN_SUITE_PAIRS:
            log.warning(
                "held-out suite %s dropped: only %d of its %d pairs are free of STS-B train/dev and corpus "
                "sentences (need %d)",
                name,
                len(clean),
                len(pairs),
                MIN_SUITE_PAIRS,
            )
            counts[name]["scored"] = 0
            continue
        if max_pairs is not None and len(clean) > max_pairs:
            keep = sorted(random.Random(0).sample(range(len(clean)), max_pairs))
            clean = [clean[i] for i in keep]
        counts[name]["scored"] = len(clean)
        kept[name] = StsPairs([p[0] for p in clean], [p[1] for p in clean], [p[2] for p in clean])
    return kept, counts


# --- preparing -----------------------------------------------------------------------------------------


def build_corpus(config: DataConfig, stsb: dict[str, StsPairs]) -> tuple[list[str], list[str]]:
    """The distillation corpus and the held-out sentences; neither contains an STS-B dev/test sentence."""
    eval_sentences = {s for split in ("dev", "test") for s in stsb[split].sentences1 + stsb[split].sentences2}
    corpus: dict[str, None] = {}
    if config.include_stsb_train:
        for sentence in stsb["train"].sentences1 + stsb["train"].sentences2:
            if sentence and sentence not in eval_sentences:
                corpus.setdefault(sentence)
    wiki = iter_wiki_sentences(config)
    taken = 0
    for sentence in wiki:
        if taken >= config.corpus_wiki_sentences:
            break
        if sentence not in eval_sentences:
            corpus.setdefault(sentence)
            taken += 1
    heldout: list[str] = []
    for sentence in wiki:
        if len(heldout) >= config.heldout_sentences:
            break
        if sentence not in corpus and sentence not in eval_sentences:
            heldout.append(sentence)
    if taken < config.corpus_wiki_sentences or len(heldout) < config.heldout_sentences:
        source = wiki_file(config) if config.source == "local" else "the Hub's wikipedia-en-sentences"
        raise DataError(
            f"{source}: the Wikipedia corpus ran out: asked for {config.corpus_wiki_sentences} corpus + "
            f"{config.heldout_sentences} held-out sentences (data.corpus_wiki_sentences + "
            f"data.heldout_sentences), the file gave {taken} + {len(heldout)} usable ones; lower "
            f"data.corpus_wiki_sentences or data.heldout_sentences, or use a larger sentence file"
        )
    if not corpus:
        raise DataError(
            "the distillation corpus is empty: set data.corpus_wiki_sentences > 0 "
            "or data.include_stsb_train=true"
        )
    return list(corpus), heldout


def cap_eval_pairs(stsb: dict[str, StsPairs], max_pairs: int | None) -> dict[str, StsPairs]:
    """STS-B with dev and test cut to their first ``max_pairs`` pairs (train as it is)."""
    if max_pairs is None:
        return stsb
    return {
        split: StsPairs(*(col[:max_pairs] for col in (p.sentences1, p.sentences2, p.scores)))
        if split != "train"
        else p
        for split, p in stsb.items()
    }


@dataclass(frozen=True)
class DataCheck:
    """What :func:`check_data` found: the sizes the flow's data step will produce."""

    corpus_size: int
    heldout_size: int
    sts_pairs: dict[str, int]
    heldout_suite_pairs: dict[str, int]  # suite -> pairs in the file(s), before decontamination


def check_data(config: DataConfig) -> DataCheck:
    """Read every local input the flow reads, as it reads it, and raise ``DataError`` on the first problem.

    The STS-B file and the held-out suite files are parsed in full (they are small); the Wikipedia file is
    streamed only as far as the corpus and held-out sentences go. Nothing is written. A ``hub`` source is not
    checked (it needs the network); its sizes are the requested ones.
    """
    if config.source != "local":
        return DataCheck(config.corpus_wiki_sentences, config.heldout_sentences, {}, {})
    stsb = cap_eval_pairs(read_stsb(config), config.max_eval_pairs)
    corpus, heldout = build_corpus(config, stsb)
    suites = read_heldout_suites(config)
    return DataCheck(
        corpus_size=len(corpus),
        heldout_size=len(heldout),
        sts_pairs={split: len(p) for split, p in stsb.items()},
        heldout_suite_pairs={name: len(p) for name, p in suites.items()},
    )


def _retry_unless_bad_input(task: object, task_run: object, state: object) -> bool:
    """Prefect retry condition: a ``DataError`` is the input's fault, and reading it again fails again."""
    return not isinstance(getattr(state, "data", None), DataError)


@task(name="prepare-data", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_bad_input)
def prepare_data(config: DataConfig, work_dir: Path) -> PreparedData:
    """Read, check and write STS-B splits, the corpus and held-out sentences under ``work_dir/data``."""
    stsb = read_stsb(config)
    seen = [stsb["train"], stsb["dev"]]  # uncapped: what CoSENT trains on and what selects checkpoints
    stsb = cap_eval_pairs(stsb, config.max_eval_pairs)
    corpus, heldout = build_corpus(config, stsb)
    # STS-B train and dev count whether or not train is in the corpus: CoSENT trains on its labels
    suites, suite_counts = decontaminate_suites(
        read_heldout_suites(config) if config.source == "local" else {},
        seen,
        corpus,
        config.heldout_suite_max_pairs,
    )
    for name, counts in suite_counts.items():
        log.info(
            "held-out suite %s: %d pairs, %d contaminated (STS-B train/dev pair or sentence, or corpus "
            "sentence), %d clean, %d scored",
            name,
            counts["total"],
            counts["contaminated"],
            counts["clean"],
            counts["scored"],
        )

    files: dict[str, str] = {
        "corpus.txt": "\n".join(corpus) + "\n",
        "heldout.txt": "\n".join(heldout) + "\n",
    }
    for split, pairs in stsb.items():
        files[f"stsb-{split}.jsonl"] = _jsonl(pairs)
    for name, pairs in suites.items():
        files[f"heldout-{name}.jsonl"] = _jsonl(pairs)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode())
    fingerprint = digest.hexdigest()

    root = Path(work_dir) / "data" / fingerprint[:16]
    if not root.is_dir():
        tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            tmp.rename(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not root.is_dir():
                raise
    prepared = PreparedData(
        root=root,
        fingerprint=fingerprint,
        corpus_size=len(corpus),
        heldout_size=len(heldout),
        sts_pairs={split: len(p) for split, p in stsb.items()},
        heldout_suites={name: len(p) for name, p in suites.items()},
        heldout_suite_counts=suite_counts,
    )
    log.info(
        "data ready in %s: corpus %d sentences, held-out %d, STS-B pairs %s",
        root,
        prepared.corpus_size,
        prepared.heldout_size,
        prepared.sts_pairs,
    )
    return prepared


def _jsonl(pairs: StsPairs) -> str:
    return "".join(
        json.dumps({"sentence1": a, "sentence2": b, "score": s}, ensure_ascii=False) + "\n"
        for a, b, s in zip(pairs.sentences1, pairs.sentences2, pairs.scores, strict=True)
    )


def read_lines(path: Path) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def read_sts(path: Path) -> StsPairs:
    rows = [json.loads(line) for line in read_lines(path)]
    return StsPairs(
        [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [r["score"] for r in rows]
    )
