"""The command line asks the read/write plan (`plan.resolve_read` / `resolve_write`) which
file each rank reads or writes, and how it dispatches its commands. No engine is started:
the configs are built from parsed flags, the files are real (written by ``convert`` and by
the format writer)."""

import pytest

from tensorize_vllm_model.format.record import ParallelLayout
from tensorize_vllm_model.plan import resolve_read, resolve_write

TP2_RANK1 = ParallelLayout(tensor_parallel_size=2, tp_rank=1)


def _parse(*argv):
    from tensorize_vllm_model.cli import build_parser

    return build_parser().parse_args([str(a) for a in argv])


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
