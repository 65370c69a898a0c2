"""The command line asks the read/write plan (`plan.resolve_read` / `resolve_write`) which
file each rank reads or writes, and how it dispatches its commands. No engine is started:
the configs are built from parsed flags, the files are real (written by ``convert`` and by
the format writer)."""

import pytest

from tensorize_vllm_model.config.plan import resolve_read, resolve_write
from tensorize_vllm_model.format.record import ParallelLayout

TP2_RANK1 = ParallelLayout(tensor_parallel_size=2, tp_rank=1)


def _parse(*argv):
    from tensorize_vllm_model.cli import parse_command_line

    return parse_command_line([str(a) for a in argv])


def _deserialize_config(model, directory, tp):
    from tensorize_vllm_model.cli import deserialize_config

    return deserialize_config(
        _parse(
            "--model",
            model,
            "--tensor-parallel-size",
            tp,
            "deserialize",
            "--serialized-directory",
            directory,
        )
    )


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    """A ``convert`` output: one checkpoint-form model.tensors for every layout."""
    from tensorize_vllm_model.cli import main

    out = tmp_path_factory.mktemp("converted")
    argv = ["--model", str(tiny_llama), "convert", "--serialized-directory", str(out)]
    assert main([*argv, "--suffix", "v1"]) == 0
    directory = out / "vllm" / "tiny-llama" / "v1"
    assert sorted(p.name for p in directory.glob("*.tensors")) == ["model.tensors"]
    return directory


@pytest.fixture(scope="module")
def rank_files(tmp_path_factory):
    """A serialized TP=2 directory: model-rank-000.tensors and model-rank-001.tensors."""
    import torch

    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors

    directory = tmp_path_factory.mktemp("tp2")
    for rank in range(2):
        record = FileRecord(tensor_parallel_size=2, rank=rank)
        path = str(directory / f"model-rank-{rank:03d}.tensors")
        write_tensors(path, [("w", torch.ones(2), False)], record=record).commit()
    return directory


def test_deserialize_converted_directory_at_tp2_reads_the_shared_file(tiny_llama, converted):
    config = _deserialize_config(tiny_llama, converted, 2)
    assert config.given_uri is None and config.tensorizer_dir == str(converted)
    plan = resolve_read(config, TP2_RANK1)
    assert plan.shared and plan.uri == str(converted / "model.tensors")
    assert plan.rank_uris() == [str(converted / "model.tensors")]


def test_deserialize_serialized_tp2_directory_reads_the_rank_files(tiny_llama, rank_files):
    config = _deserialize_config(tiny_llama, f"{rank_files}/", 2)
    plan = resolve_read(config, TP2_RANK1)
    assert not plan.shared and plan.uri == str(rank_files / "model-rank-001.tensors")
    assert plan.rank_uris() == [str(rank_files / f"model-rank-{r:03d}.tensors") for r in (0, 1)]
    assert plan.file_config().tensorizer_uri == str(rank_files / "model-rank-%03d.tensors")


def test_deserialize_directory_flag_wins_over_extra_config_uri(tiny_llama, rank_files):
    from tensorize_vllm_model.cli import deserialize_config

    args = _parse(
        "--model",
        tiny_llama,
        "--model-loader-extra-config",
        '{"tensorizer_uri": "/elsewhere/model.tensors"}',
        "deserialize",
        "--serialized-directory",
        rank_files,
    )
    config = deserialize_config(args)
    assert (config.given_uri, config.tensorizer_dir) == (None, str(rank_files))


def test_serialize_config_leaves_the_file_names_to_the_write_plan(tiny_llama, tmp_path):
    from tensorize_vllm_model.cli import serialize_config

    args = _parse(
        "--model",
        tiny_llama,
        "serialize",
        "--serialized-directory",
        tmp_path,
        "--suffix",
        "v1",
    )
    config = serialize_config(args)
    directory = tmp_path / "vllm" / "tiny-llama" / "v1"
    assert config.given_uri is None and config.tensorizer_dir == str(directory)
    one = resolve_write(config, ParallelLayout())
    assert (one.uri, one.directory) == (str(directory / "model.tensors"), str(directory))
    two = resolve_write(config, TP2_RANK1)
    assert two.template == str(directory / "model-rank-%03d.tensors")
    assert two.uri == str(directory / "model-rank-001.tensors")


# -- dispatch: the command word, flags before inspect/verify/convert, main's exit codes -----


def _main(capsys, *argv):
    """`main`'s exit code (it never raises SystemExit), stdout, and stderr's lines."""
    from tensorize_vllm_model.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_command_word_is_not_a_flags_value(capsys, tmp_path):
    """``--suffix convert`` is serialize's suffix, not the convert command: the run gets as
    far as serialize's own --model check (no engine starts)."""
    missing = tmp_path / "absent-model"
    code, _, err = _main(
        capsys, "--model", missing, "serialize", "--serialized-directory", tmp_path,
        "--suffix", "convert",
    )  # fmt: skip
    assert (code, err) == (2, [f"error: --model {missing}: no such directory"])


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_engine_flags_before_a_file_command_refused(capsys, tmp_path, command):
    code, _, err = _main(capsys, "--dtype", "float32", command, tmp_path / "model.tensors")
    assert code == 2
    assert err == [
        f"error: {command} takes no flags before it (got --dtype); give its own flags after "
        f"it: python -m tensorize_vllm_model {command} URI [--keyfile KEYFILE] ..."
    ]


def test_engine_flags_before_convert_refused(capsys, tiny_llama, tmp_path):
    code, _, err = _main(
        capsys, "--model", tiny_llama, "--tensor-parallel-size", "2", "convert",
        "--serialized-directory", tmp_path,
    )  # fmt: skip
    assert code == 2
    assert err == [
        "error: convert takes only --model, --dtype, --revision, --download-dir before it, "
        "not --tensor-parallel-size"
    ]
    assert not list(tmp_path.iterdir())  # nothing written


def test_help_lists_convert_and_returns_zero(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
    for command in ("serialize", "deserialize", "inspect", "verify"):
        assert f" {command} " in text
    assert "convert Convert a Hugging Face checkpoint into one tensorizer file" in text


def test_usage_error_returns_two(capsys, tmp_path):
    code, _, err = _main(capsys, "inspect", tmp_path / "x.tensors", "--no-such-flag")
    assert code == 2 and err[-1].endswith(
        "error: unrecognized arguments: --no-such-flag (see python -m tensorize_vllm_model "
        "inspect --help)"
    )


def test_num_readers_zero_names_the_flag(capsys, converted):
    code, _, err = _main(capsys, "verify", converted / "model.tensors", "--num-readers", "0")
    assert (code, err) == (2, ["error: --num-readers must be a positive integer, got 0"])


def test_convert_keyfile_directory_refused_before_any_notice(capsys, tiny_llama, tmp_path):
    keydir = tmp_path / "keys"
    keydir.mkdir()
    out_dir = tmp_path / "out"
    code, out, err = _main(
        capsys, "--model", tiny_llama, "convert", "--serialized-directory", out_dir,
        "--keyfile", keydir,
    )  # fmt: skip
    assert code == 2 and "encrypting with the existing key" not in out
    assert len(err) == 1 and err[0].startswith(f"error: cannot read the key file {keydir}")
    assert not out_dir.exists()


def test_convert_keyfile_help_says_an_existing_key_is_used():
    from tensorize_vllm_model.cli import build_parser

    text = " ".join(build_parser("convert").format_help().split())
    assert "A path (or s3://, gs://, az:// URI) that holds a key: encrypt with that key" in text
    # the destination's help once named s3:// only, though gs:// and az:// are written too
    assert "gs://bucket[/prefix] or az://container[/prefix]" in text
    assert "randomly generated key saved here" not in text


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    """``inspect F | head -1``: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    import torch

    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors
    from tests.support.commands import subprocess_env

    path = str(tmp_path / "many.tensors")
    tensors = [(f"layer.{i}.weight", torch.ones(1), False) for i in range(4000)]
    write_tensors(path, tensors, record=FileRecord()).commit()
    command = [sys.executable, "-m", "tensorize_vllm_model", "inspect", path]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env()
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().decode().strip() == path
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_shared_tensorizer_flags_have_one_definition():
    """--num-readers and the --s3-* flags: TensorizerArgs.add_cli_args (vLLM's API name) and
    every command that takes them show the same help, from one table."""
    import argparse

    from tensorize_vllm_model.cli import build_parser
    from tensorize_vllm_model.config import TENSORIZER_CLI_FLAGS, TensorizerArgs

    def helps(parser):
        return {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}

    parsers = [
        TensorizerArgs.add_cli_args(argparse.ArgumentParser()),
        *(build_parser(command) for command in ("serialize", "deserialize", "verify")),
    ]
    for flag in ("--s3-access-key-id", "--s3-secret-access-key", "--s3-endpoint"):
        assert {helps(p)[flag] for p in parsers} == {TENSORIZER_CLI_FLAGS[flag]["help"]}
    readers = TENSORIZER_CLI_FLAGS["--num-readers"]["help"]
    assert helps(parsers[2])["--num-readers"] == helps(parsers[3])["--num-readers"] == readers
