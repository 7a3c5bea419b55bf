"""Static students: model2vec's ``distill`` turns a transformer into a static token-embedding table.

The result is saved as an ordinary SentenceTransformer (one ``StaticEmbedding`` module), so it loads,
encodes and is benchmarked like every other variant. model2vec needs no training data: it embeds the
source model's vocabulary, reduces it with PCA and weights tokens (SIF). Stored content-addressed by the
source's key and the settings (:mod:`tasks.artifacts`), so an unchanged static student is built once.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.artifacts import ArtifactStore, stage_key
from tasks.variants import Variant

log = logging.getLogger(__name__)

STAGE = "static"
STAGE_VERSION = 1


@dataclass(frozen=True)
class StaticStudent:
    name: str
    source: Variant
    model_dir: Path
    pca_dims: int | None
    seconds: float
    key: str = ""
    reused: bool = False

    def as_variant(self) -> Variant:
        return self.source.derive(
            self.name,
            "static",
            f"static{self.pca_dims or ''}",
            {"model2vec_pca_dims": str(self.pca_dims)},
            model_dir=self.model_dir,
            backend="torch",
            model_file=None,
            build_seconds=self.seconds,
            key=self.key,
            reused=self.reused,
        )


def check_model2vec_installed() -> None:
    try:
        import model2vec.distill  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"static students need model2vec[distill] ({exc}); `pip install 'model2vec[distill]'` "
            f"or set static.sources to []"
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

    name = f"{source.name}-static{pca_dims or ''}"
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
