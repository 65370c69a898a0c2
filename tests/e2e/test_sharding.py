"""One file per rank: naming, and the refusals that come before any engine work (a missing
rank template, a missing shard, shards made for another layout). No engine starts here;
tests/e2e/test_vllm_parallel.py runs TP=2 and PP=2 engines."""

from __future__ import annotations

import time

import pytest
import torch

from tensorize_vllm_model import ConfigError, LayoutError, StorageError, TensorizerConfig
from tensorize_vllm_model.format.names import rank_uri
from tensorize_vllm_model.format.record import FileRecord, ParallelLayout
from tensorize_vllm_model.format.writer import write_tensors
from tensorize_vllm_model.inspection.checks import check_shards
from tests.support.engines import run_engine


def fake_shards(directory, tp: int, pp: int, *, skip: int | None = None) -> str:
    """Small tensors files recorded as the shards of a TP x PP layout."""
    template = str(directory / "model-rank-%03d.tensors")
    for rank in range(tp * pp):
        if rank == skip:
            continue
        write_tensors(
            template % rank,
            [("w", torch.full((2,), float(rank)), False)],
            record=FileRecord(tensor_parallel_size=tp, pipeline_parallel_size=pp, rank=rank),
        ).commit()
    return template


def test_global_rank_numbering():
    # vLLM numbers TP ranks fastest: PP stage 1 of TP=2 holds global ranks 2 and 3.
    names = [
        rank_uri(
            "d/model-rank-%03d.tensors",
            ParallelLayout(
                tensor_parallel_size=2, pipeline_parallel_size=2, tp_rank=tp, pp_rank=pp
            ),
        )
        for pp in range(2)
        for tp in range(2)
    ]
    assert names == [f"d/model-rank-00{i}.tensors" for i in range(4)]


def test_check_shards_accepts_the_right_layout(tmp_path):
    template = fake_shards(tmp_path, 2, 2)
    total = check_shards(TensorizerConfig(tensorizer_uri=template), 2, 2)
    assert total == 4 * 8


def hf_file(path) -> str:
    """A file as ``TensorSerializer.write_module(hf_model)`` writes it: not vLLM-tensorized."""
    from tensorizer import TensorSerializer

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    serializer = TensorSerializer(str(path))
    serializer.write_module(module)
    serializer.close()
    return str(path)


def vllm_builtin_file(path) -> str:
    """A file as vLLM's own serializer writes it: vLLM-tensorized (its marker), no record."""
    from tensorizer import TensorSerializer
    from tensorizer.serialization import TensorType

    serializer = TensorSerializer(str(path))
    serializer.write_tensor(0, ".vllm_tensorized_marker", TensorType.PARAM, torch.ones(1))
    serializer.write_tensor(1, "w", TensorType.PARAM, torch.ones(4))
    serializer.close()
    return str(path)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_a_file_not_vllm_tensorized_loads_at_any_layout_from_one_uri(tmp_path, tp, pp):
    """Every rank reads the whole file; vLLM's weight loaders take each rank's part."""
    uri = hf_file(tmp_path / "hf.tensors")
    assert check_shards(TensorizerConfig(tensorizer_uri=uri), tp, pp) == (16 + 4 + 8 + 2) * 4


def test_vllm_tensorized_file_without_template_refused_for_many_ranks(tmp_path):
    uri = vllm_builtin_file(tmp_path / "model.tensors")
    with pytest.raises(
        ConfigError,
        match=r"TP=2 x PP=1 needs one vLLM-tensorized file per rank.*"
        r"no rank template; use a name such as "
        r"'.*/model-rank-%03d.tensors'",
    ):
        check_shards(TensorizerConfig(tensorizer_uri=uri), 2, 1)
    assert check_shards(TensorizerConfig(tensorizer_uri=uri), 1, 1) == 16
    # Our own file of rank 0 of TP=2, given as the one URI: the same advice.
    template = fake_shards(tmp_path, 2, 1)
    with pytest.raises(ConfigError, match=r"needs one vLLM-tensorized file per rank"):
        check_shards(TensorizerConfig(tensorizer_uri=template % 0), 2, 1)


def test_unsharded_vllm_tensorized_file_at_tp2_names_both_layouts(tmp_path):
    uri = str(tmp_path / "model.tensors")
    write_tensors(uri, [("w", torch.ones(2), False)], record=FileRecord()).commit()
    with pytest.raises(
        LayoutError,
        match=r"serialized for TP=1 x PP=1 but is being loaded with "
        r"TP=2 x PP=1",
    ):
        check_shards(TensorizerConfig(tensorizer_uri=uri), 2, 1)


def test_engine_check_uses_the_directory_file(tmp_path, tiny_llama):
    """No tensorizer_uri, a serialized directory holding model.tensors only: TP=2 reads that
    file. The check vLLM's engine configuration runs (plug-in hook), with EngineArgs as vLLM
    builds them; no engine starts."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    from tensorize_vllm_model.integrations.vllm.registration import check_engine_files

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    hf_file(model / "model.tensors")
    check_engine_files(
        EngineArgs(model=str(model), load_format="tensorizer", tensor_parallel_size=2)
    )
    (model / "model.tensors").unlink()
    vllm_builtin_file(model / "model.tensors")
    with pytest.raises(ConfigError, match="needs one vLLM-tensorized file per rank"):
        check_engine_files(
            EngineArgs(model=str(model), load_format="tensorizer", tensor_parallel_size=2)
        )


def test_missing_shard_named(tmp_path):
    template = fake_shards(tmp_path, 2, 2, skip=3)
    with pytest.raises(StorageError, match=rf"no such file: {tmp_path / 'model-rank-003.tensors'}"):
        check_shards(TensorizerConfig(tensorizer_uri=template), 2, 2)


def test_other_layout_names_both(tmp_path):
    template = fake_shards(tmp_path, 2, 1)
    with pytest.raises(
        LayoutError,
        match=r"serialized for TP=2 x PP=1 but is being loaded with "
        r"TP=1 x PP=2",
    ):
        check_shards(TensorizerConfig(tensorizer_uri=template), 1, 2)
    with pytest.raises(
        LayoutError,
        match=r"serialized for TP=2 x PP=1 but is being loaded with "
        r"TP=1 x PP=1",
    ):
        check_shards(TensorizerConfig(tensorizer_uri=template % 0), 1, 1)


def test_cli_refuses_missing_shard_without_engine(tmp_path, tiny_llama):
    from tests.support.commands import run_cli

    template = fake_shards(tmp_path, 2, 1, skip=1)
    start = time.monotonic()
    proc = run_cli(
        "--model",
        tiny_llama,
        "--tensor-parallel-size",
        "2",
        "deserialize",
        "--path-to-tensors",
        template,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: no such file: {tmp_path / 'model-rank-001.tensors'}"
    )
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_llm_refuses_other_layout_before_starting_workers(tmp_path, tiny_llama):
    """LLM() itself (no command line): the check runs in the caller's process, before vLLM
    starts its engine and workers."""
    template = fake_shards(tmp_path, 2, 1)
    start = time.monotonic()
    proc = run_engine(
        {
            "model": str(tiny_llama),
            "load_format": "tensorizer",
            "model_loader_extra_config": {"tensorizer_uri": template % 0},
        },
        expect_ok=False,
        separate_processes=True,
    )
    assert proc.returncode != 0
    assert (
        f"{tmp_path / 'model-rank-000.tensors'} was serialized for TP=2 x PP=1 but is being "
        "loaded with TP=1 x PP=1"
    ) in proc.stderr
    assert "EngineCore" not in proc.stderr  # no engine process was started
    assert time.monotonic() - start < 60
