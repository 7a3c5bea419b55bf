"""Shared fixtures: the real data folder, tiny random BERT SentenceTransformers, small configs."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

pytest_plugins = ["tests.stop_on_sigterm"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared STS-B / Wikipedia folder (``DISTILL_DATA_DIR`` or ../shared/data)."""
    path = Path(os.environ.get("DISTILL_DATA_DIR") or DEFAULT_DATA_DIR)
    if not (path / "stsb.tsv.gz").is_file():
        pytest.fail(f"no stsb.tsv.gz in {path}: set DISTILL_DATA_DIR to the shared data folder")
    return path


def build_tiny_model(out_dir: Path, num_layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A random BERT SentenceTransformer (mean pooling + Normalize) with a WordPiece vocab written here."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(seed)
    hf_dir = out_dir / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces + [f"##{p}" for p in pieces]
    vocab += ["the", "a", "is", "of", "and", "man", "woman", "dog", "cat", "playing", "in", "on"]
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(hf_dir / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, "mean"), Normalize()], device="cpu")
    st_dir = out_dir / "st"
    model.save(str(st_dir))
    return st_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_light_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrower (16-d, 2-layer) random BERT: a light pretrained student for the 32-d tiny teacher."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-light-bert"), num_layers=2, hidden=16, seed=1)


def tiny_config(model_dir: Path, data_dir: Path, root: Path, light_model_dir: Path | None = None) -> dict:
    """A config that runs the whole DAG on the tiny model in seconds, everything under ``root``."""
    light = [{"model": str(light_model_dir), "name": "light", "projection": "pca"}] if light_model_dir else []
    return {
        "profile": "quick",
        "work_dir": str(root / "work"),
        "teacher": {"model": str(model_dir)},
        "data": {
            "data_dir": str(data_dir),
            "corpus_wiki_sentences": 200,
            "include_stsb_train": False,
            "heldout_sentences": 60,
            "max_eval_pairs": 80,
            "heldout_suite_max_pairs": 40,
        },
        "students": [{"num_layers": 2}, {"layers": [0, 3], "name": "ends"}],
        "light_students": light,
        "training": {"batch_size": 32, "evaluations_per_epoch": 2},
        "static": {"sources": ["teacher", "ends"], "pca_dims": 16},
        "compress": {"steps": tiny_compress_steps(["teacher", "ends"])},
        # one thread and the median of 7 (a timing is ~25 ms): a tiny model's many small parallel regions
        # stall on 2 shared cores, and two runs' speed-ups are compared (the benchmark flow test)
        "benchmark": {
            "speed_sentences": 60,
            "batch_size": 32,
            "repeats": 7,
            "warmup_batches": 1,
            "threads": 1,
        },
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "test"},
    }


def tiny_compress_steps(targets: list[str]) -> list[dict]:
    """Every technique on ``targets`` (PCA on the first), sized for the tiny model and corpus."""
    return [
        {"technique": "pca", "targets": targets[:1], "dims": [16, 8], "fit_sentences": 100},
        {"technique": "truncate", "targets": targets[:1], "dims": [16, 8]},
        {"technique": "emb-int8", "targets": targets, "calibration_sentences": 100},
        {"technique": "emb-binary", "targets": targets},
        {"technique": "torch-int8", "targets": targets},
        {"technique": "openvino-int8", "targets": targets, "calibration_sentences": 20},
        {"technique": "onnx", "targets": targets},
        {
            "technique": "onnx-int8",
            "targets": targets,
            "then": [{"technique": "emb-int8", "calibration_sentences": 100}],
        },
    ]


@pytest.fixture()
def tiny_config_dict(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> dict:
    return tiny_config(tiny_model_dir, data_dir, tmp_path)


def tiny_prepared(model_dir: Path, data_dir: Path, root: Path):
    """Prepared data (120 corpus sentences, small evaluation sets) and the tiny teacher's embeddings."""
    from tasks.config import DataConfig
    from tasks.data import prepare_data
    from tasks.teacher_cache import get_or_encode

    data = prepare_data.fn(
        DataConfig(
            data_dir=data_dir,
            corpus_wiki_sentences=120,
            include_stsb_train=False,
            heldout_sentences=20,
            max_eval_pairs=20,
            heldout_suite_max_pairs=20,
        ),
        root,
    )
    return data, get_or_encode(model_dir, data.corpus_file, root / "cache")
