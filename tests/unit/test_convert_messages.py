"""`convert`'s refusals of a wrong --model say what to do next, without an engine: a weights
file given for the checkpoint directory, and a directory that is already converted."""

from __future__ import annotations

import shutil

from tensorize_vllm_model.cli import main


def convert(model, out, capsys) -> str:
    assert main(["--model", str(model), "convert", "--serialized-directory", str(out)]) != 0
    return capsys.readouterr().err


def test_a_weights_file_is_refused_naming_the_directory_to_give(tiny_llama, tmp_path, capsys):
    err = convert(tiny_llama / "model.safetensors", tmp_path / "out", capsys)
    assert "is a file; --model takes the checkpoint DIRECTORY" in err
    assert f"--model '{tiny_llama}'" in err
    assert "Repo id must be" not in err
    assert not (tmp_path / "out").exists()


def test_a_converted_directory_is_refused_with_how_to_load_it(tiny_llama, tmp_path, capsys):
    assert main(["--model", str(tiny_llama), "convert", "--serialized-directory",
                 str(tmp_path / "first"), "--suffix", "v1"]) == 0  # fmt: skip
    converted = tmp_path / "first" / "vllm" / "tiny-llama" / "v1"
    capsys.readouterr()
    err = convert(converted, tmp_path / "again", capsys)
    assert "looks already converted (it holds model.tensors)" in err
    assert "--load-format tensorizer" in err


def test_a_directory_without_weights_says_what_to_give(tiny_llama, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_llama / "config.json", bare)
    err = convert(bare, tmp_path / "out", capsys)
    assert "holds no weights" in err and "checkpoint directory" in err
