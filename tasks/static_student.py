"""Static students: model2vec's ``distill`` turns a transformer into a static token-embedding table.

The result is saved as an ordinary SentenceTransformer (one ``StaticEmbedding`` module), so it loads,
encodes and is benchmarked like every other variant. model2vec needs no training data: it embeds the
source model's vocabulary, reduces it with PCA and weights tokens (SIF). Stored content-addressed by the
source's key and the settings (:mod:`tasks.artifacts`), so an unchanged static student is built once.

:func:`train_static` goes one step further, as model2vec's ``tokenlearn`` does: the distilled table is
trained so that sentence means reproduce the teacher's cached corpus embeddings (PCA-reduced to the table's
dimension) through a linear head that is dropped afterwards, with early stopping on held-back corpus rows.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task

from tasks.artifacts import ArtifactStore, stage_key
from tasks.config import StaticStudentConfig
from tasks.devices import device_label
from tasks.pca import fit_pca
from tasks.teacher_cache import CachedEmbeddings
from tasks.variants import Variant

log = logging.getLogger(__name__)

STAGE = "static"
STAGE_VERSION = 1
TRAINED_STAGE = "static-trained"
TRAINED_STAGE_VERSION = 2
# Corpus rows held back to stop training (tokenlearn's split: the last tenth, at most 10,000 rows).
MAX_VALIDATION_ROWS = 10_000
MIN_TRAIN_SENTENCES = 10


def static_step(pca_dims: int | None, trained: bool = False) -> str:
    """The lineage step of a static student, and its row name after ``<source>-``: ``static256[-trained]``."""
    return f"static{pca_dims or ''}" + ("-trained" if trained else "")


@dataclass(frozen=True)
class StaticStudent:
    name: str
    source: Variant
    model_dir: Path
    pca_dims: int | None
    seconds: float
    key: str = ""
    reused: bool = False
    train_sentences: int | None = None  # corpus rows it was trained on; None: distilled only
    params: tuple[tuple[str, str], ...] = ()

    def as_variant(self) -> Variant:
        step = static_step(self.pca_dims, trained=bool(self.train_sentences))
        # a distilled table inherits its source's corpus size (a student's); a trained one states its own
        trained = {"train_sentences": self.train_sentences} if self.train_sentences else {}
        return self.source.derive(
            self.name,
            "static",
            step,
            {"model2vec_pca_dims": str(self.pca_dims), **dict(self.params)},
            model_dir=self.model_dir,
            backend="torch",
            model_file=None,
            build_seconds=self.seconds,
            key=self.key,
            **trained,
            reused=self.reused,
        )


def check_model2vec_installed(train: bool = False) -> None:
    try:
        import model2vec.distill  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"static students need model2vec[distill] ({exc}); `pip install 'model2vec[distill]'` "
            f"or set static.sources to []"
        ) from exc
    if train:
        try:
            import tokenlearn.pretrain  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"static.train needs tokenlearn ({exc}); `pip install tokenlearn`, or set static.train: false"
            ) from exc


def distill_static(
    source: Variant,
    artifacts: Path,
    pca_dims: int | None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> StaticStudent:
    """model2vec-distill ``source`` into a SentenceTransformer folder in the store (or reuse it)."""
    check_model2vec_installed()
    import model2vec

    name = f"{source.name}-{static_step(pca_dims)}"
    inputs = {"source": source.key, "pca_dims": pca_dims, "model2vec": model2vec.__version__}
    key = stage_key(STAGE, STAGE_VERSION, inputs)

    def build(out_dir: Path, _work: Path) -> dict:
        from model2vec.distill import distill
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        start = time.perf_counter()
        static = distill(
            model_name=str(source.model_dir),
            pca_dims=pca_dims,
            trust_remote_code=trust_remote_code,
            device=device,  # the vocabulary is encoded once by the source model
        )
        with tempfile.TemporaryDirectory() as m2v_dir:
            static.save_pretrained(m2v_dir)
            model = SentenceTransformer(modules=[StaticEmbedding.from_model2vec(m2v_dir)], device="cpu")
            model.save(str(out_dir / "model"))
        seconds = time.perf_counter() - start
        log.info("static student %s distilled from %s in %.0f s", name, source.model_dir, seconds)
        return {"seconds": seconds}

    entry = ArtifactStore(artifacts).build(STAGE, key, build, f"static student {name}")
    return StaticStudent(
        name, source, entry.path / "model", pca_dims, entry.result["seconds"], key, entry.reused
    )


def check_training_corpus(sentences: int) -> None:
    if sentences < MIN_TRAIN_SENTENCES:
        raise ValueError(
            f"static.train needs at least {MIN_TRAIN_SENTENCES} corpus sentences, the corpus has "
            f"{sentences}: raise data.corpus_wiki_sentences or set static.train to false"
        )


def train_static(
    source: Variant,
    corpus_file: Path,
    corpus_embeddings: CachedEmbeddings,
    artifacts: Path,
    settings: StaticStudentConfig,
    seed: int,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> StaticStudent:
    """A static student distilled from ``source`` and then trained on the teacher's corpus embeddings.

    tokenlearn's recipe (:func:`tokenlearn.pretrain.train_supervised`): the targets are the cached teacher
    embeddings reduced by PCA to the table's dimension; each sentence's weighted token mean goes through a
    linear head to them (MSE); the head is dropped, the trained token vectors kept. The last tenth of the
    corpus (at most 10,000 rows) is held back and training stops when its loss stops improving
    (``settings.patience`` checks). Training-side data only: no STS-B labels, dev or held-out suites.
    """
    check_model2vec_installed(train=True)
    import model2vec

    rows = corpus_embeddings.rows
    check_training_corpus(rows)
    dims = settings.pca_dims or corpus_embeddings.dim
    name = f"{source.name}-{static_step(settings.pca_dims, trained=True)}"
    inputs = {
        "source": source.key,
        "pca_dims": settings.pca_dims,
        "targets": corpus_embeddings.key,
        "training": settings.model_dump(mode="json", include={"learning_rate", "batch_size", "patience"}),
        "seed": seed,
        "model2vec": model2vec.__version__,
        "tokenlearn": importlib.metadata.version("tokenlearn"),
    }
    key = stage_key(TRAINED_STAGE, TRAINED_STAGE_VERSION, inputs)

    def build(out_dir: Path, _work: Path) -> dict:
        import torch
        from model2vec import StaticModel
        from model2vec.distill import distill
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        from tokenlearn.pretrain import TextDataset, train_supervised

        from tasks.students import corpus_blocks

        start = time.perf_counter()
        blocks = list(corpus_blocks(corpus_file, corpus_embeddings))  # sentences paired with their vectors
        texts = [text for block_texts, _ in blocks for text in block_texts]
        targets = np.concatenate([vectors for _, vectors in blocks]).astype(np.float32)
        pca = fit_pca(targets, dims, seed)
        targets = pca.transform(targets).astype(np.float32)
        held_back = min(MAX_VALIDATION_ROWS, max(1, rows // 10))
        static = distill(
            model_name=str(source.model_dir),
            pca_dims=settings.pca_dims,
            quantize_to="float32",  # trained in float32
            trust_remote_code=trust_remote_code,
            device=device,
        )
        log.info(
            "training static student %s on %d corpus sentences (%d held back to stop), %d dims, on %s",
            name,
            rows - held_back,
            held_back,
            dims,
            device,
        )
        torch.manual_seed(seed)
        train = TextDataset(texts[:-held_back], torch.from_numpy(targets[:-held_back]), static.tokenizer)
        validation = TextDataset(texts[-held_back:], torch.from_numpy(targets[-held_back:]), static.tokenizer)
        trained = train_supervised(
            train_dataset=train,
            validation_dataset=validation,
            model=static,
            patience=settings.patience,
            device=device,
            batch_size=settings.batch_size,
            lr=settings.learning_rate,
        )
        # stored in float16 like model2vec's distilled tables: half the size, the same scores
        half = StaticModel(
            vectors=trained.embedding.astype(np.float16), tokenizer=trained.tokenizer, config=trained.config
        )
        with tempfile.TemporaryDirectory() as m2v_dir:
            half.save_pretrained(m2v_dir)
            model = SentenceTransformer(modules=[StaticEmbedding.from_model2vec(m2v_dir)], device="cpu")
            model.save(str(out_dir / "model"))
        seconds = time.perf_counter() - start
        log.info("static student %s trained in %.0f s", name, seconds)
        return {
            "seconds": seconds,
            "train_sentences": rows - held_back,
            "pca_explained_variance": f"{pca.explained_variance_ratio_.sum():.4f}",
            "train_device": device_label(device),  # a stored student keeps where it was first trained
        }

    entry = ArtifactStore(artifacts).build(TRAINED_STAGE, key, build, f"trained static student {name}")
    result = entry.result
    params = (
        ("static_training", "tokenlearn"),
        ("static_learning_rate", str(settings.learning_rate)),
        ("static_target_pca_variance", result["pca_explained_variance"]),
        ("train_device", result["train_device"]),
    )
    return StaticStudent(
        name,
        source,
        entry.path / "model",
        settings.pca_dims,
        result["seconds"],
        key,
        entry.reused,
        train_sentences=result["train_sentences"],
        params=params,
    )


# The Prefect task; its logic stays callable as a plain function (``task.fn`` is the function itself).
train_static_task = task(train_static, name="train-static-student")


@task(name="distill-static-student")
def distill_static_task(
    source: Variant,
    artifacts: Path,
    pca_dims: int | None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> StaticStudent:
    """Prefect task around :func:`distill_static`."""
    return distill_static(source, artifacts, pca_dims, trust_remote_code, device)
