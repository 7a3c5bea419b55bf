"""Static students: model2vec's ``distill`` turns a transformer into a static token-embedding table.

The result is saved as an ordinary SentenceTransformer (one ``StaticEmbedding`` module), so it loads,
encodes and is benchmarked like every other variant. model2vec needs no training data: it embeds the
source model's vocabulary, reduces it with PCA and weights tokens (SIF).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.files import atomic_dir
from tasks.variants import Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticStudent:
    name: str
    source: Variant
    model_dir: Path
    pca_dims: int | None
    seconds: float

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
    source: Variant, out_root: Path, pca_dims: int | None, trust_remote_code: bool = False
) -> StaticStudent:
    """model2vec-distill ``source`` and save it as a SentenceTransformer folder under ``out_root``."""
    check_model2vec_installed()
    from model2vec.distill import distill
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    start = time.perf_counter()
    name = f"{source.name}-static{pca_dims or ''}"
    out_dir = Path(out_root) / name
    static = distill(
        model_name=str(source.model_dir), pca_dims=pca_dims, trust_remote_code=trust_remote_code, device="cpu"
    )
    with tempfile.TemporaryDirectory() as m2v_dir, atomic_dir(out_dir) as tmp:
        static.save_pretrained(m2v_dir)
        SentenceTransformer(modules=[StaticEmbedding.from_model2vec(m2v_dir)], device="cpu").save(str(tmp))
    seconds = time.perf_counter() - start
    log.info("static student %s distilled from %s in %.0f s", name, source.model_dir, seconds)
    return StaticStudent(name, source, out_dir, pca_dims, seconds)


@task(name="distill-static-student")
def distill_static_task(
    source: Variant, out_root: Path, pca_dims: int | None, trust_remote_code: bool = False
) -> StaticStudent:
    """Prefect task around :func:`distill_static`."""
    return distill_static(source, out_root, pca_dims, trust_remote_code)
