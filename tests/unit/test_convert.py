"""``convert`` without vLLM: the file it writes, its refusals, the read plan of every rank,
and the partial reads the loader makes (no engine; seconds)."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tensorize_vllm_model import open_tensors
from tensorize_vllm_model.cli import main
from tensorize_vllm_model.convert import convert_checkpoint
from tensorize_vllm_model.convert.fit import check_layout_fits
from tensorize_vllm_model.convert.placement import (
    TensorShape,
    column_tiles,
    rank_reads,
    split_dim,
)
from tensorize_vllm_model.convert.regions import CopyWatch, box_byte_range, view_box
from tensorize_vllm_model.core.errors import ConfigError, LayoutError, StorageError
from tensorize_vllm_model.format.record import MARKER_NAME
from tensorize_vllm_model.read.partial import read_parts
from tensorize_vllm_model.read.parts import Part, PartsRead
from tests.support import CONVERTED_FILES
from tests.support.commands import convert_without_vllm


@pytest.fixture(scope="module")
def converted(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    proc = convert_without_vllm(
        "--model", tiny_llama, "convert", "--serialized-directory", out, "--suffix", "v1"
    )
    assert proc.returncode == 0, proc.stderr
    return out / "vllm" / "tiny-llama" / "v1"


def test_convert_runs_without_vllm_and_lays_out_like_serialize(converted):
    names = sorted(p.name for p in converted.iterdir())
    assert names == CONVERTED_FILES


def test_converted_file_holds_the_checkpoint(converted, tiny_llama):
    original = load_file(str(tiny_llama / "model.safetensors"))
    with open_tensors(str(converted / "model.tensors")) as reader:
        record = reader.record
        assert reader.checkpoint_form and not reader.vllm_tensorized
        assert MARKER_NAME not in reader.header_deserializer  # vLLM must not take it for its own
        tensors = dict(reader.items())
    assert record.is_checkpoint_form and record.dtype == "bfloat16"
    assert record.architecture == "LlamaForCausalLM"
    row_parallel = {
        f"model.layers.{i}.{m}.weight"
        for i in (0, 1)
        for m in ("self_attn.o_proj", "mlp.down_proj")
    }
    # recorded by name pattern (one per weight of every layer: format.record.TileMap)
    assert set(record.column_tiles) == {
        "model.layers.*.self_attn.o_proj.weight",
        "model.layers.*.mlp.down_proj.weight",
    }
    assert {n for n in original if n in record.column_tiles} == row_parallel
    assert set(tensors) == set(original)
    for name, tensor in original.items():
        tiles = record.column_tiles.get(name, 0)
        assert tiles == column_tiles(name, tensor.shape) and (tiles == 8) == (name in row_parallel)
        assert torch.equal(_untiled(tensors[name], tiles), tensor), name


def _untiled(stored: torch.Tensor, tiles: int) -> torch.Tensor:
    """A tensor stored in `tiles` column tiles ([T, out, in / T]) as the checkpoint's
    [out, in]: tile j holds columns [j * in / T, (j + 1) * in / T)."""
    if not tiles:
        return stored
    count, out, width = stored.shape
    return stored.permute(1, 0, 2).reshape(out, count * width)


def test_inspect_and_verify_read_a_converted_file(converted, capsys):
    assert main(["verify", str(converted / "model.tensors")]) == 0
    assert main(["inspect", str(converted / "model.tensors")]) == 0
    out = capsys.readouterr().out
    assert "parallel layout: any (checkpoint form" in out and "4 row-parallel" in out


def test_bin_checkpoint_and_dtype(tiny_opt, tmp_path):
    source = tmp_path / "opt-bin"
    source.mkdir()
    state = load_file(str(tiny_opt / "model.safetensors"))
    torch.save(state, source / "pytorch_model.bin")
    for name in os.listdir(tiny_opt):
        if not name.endswith(".safetensors"):
            (source / name).write_bytes((tiny_opt / name).read_bytes())
    result = convert_checkpoint(str(source), str(tmp_path / "out"), suffix="f32", dtype="float32")
    with open_tensors(result.tensors_uri) as reader:
        assert reader.record.dtype == "float32"
        assert reader.record.extra["source_format"] == "bin"
        tensors = dict(reader.items())
    assert set(tensors) == set(state)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    name = "model.decoder.layers.0.fc2.weight"
    tiles = reader.record.column_tiles[name]
    assert torch.equal(_untiled(tensors[name], tiles), state[name].float())


def _copy_checkpoint(source, target, config_changes, tensors=None):
    """A copy of checkpoint `source` in `target`, its config.json changed, its weights
    replaced by `tensors` when given."""
    from safetensors.torch import save_file

    target.mkdir()
    for name in os.listdir(source):
        if not name.endswith(".safetensors"):
            (target / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    state = tensors if tensors is not None else load_file(str(source / "model.safetensors"))
    save_file(state, str(target / "model.safetensors"))
    return state


def test_dtype_auto_records_the_tensors_dtype_not_the_configs(tiny_llama, tmp_path):
    # config.json says float32, the tensors are bfloat16: the record names what is stored
    source = tmp_path / "says-f32"
    _copy_checkpoint(tiny_llama, source, {"torch_dtype": "float32"})
    result = convert_checkpoint(str(source), str(tmp_path / "out"), suffix="a")
    with open_tensors(result.tensors_uri) as reader:
        assert reader.record.dtype == "bfloat16"


def test_fp8_weights_without_a_quantization_config_are_refused(tiny_llama, tmp_path):
    from tensorize_vllm_model.core.errors import ConfigError

    state = load_file(str(tiny_llama / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)
    source = tmp_path / "fp8"
    _copy_checkpoint(tiny_llama, source, {}, state)
    with pytest.raises(ConfigError, match=f"tensor {name} is float8_e4m3fn but config.json "):
        convert_checkpoint(str(source), str(tmp_path / "out"), suffix="a")
    assert not (tmp_path / "out").exists()
    # with its quantization_config it converts, every dtype kept; a cast is refused
    quantized = tmp_path / "fp8-quantized"
    _copy_checkpoint(source, quantized, {"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ConfigError, match="--dtype float16: .* quantized checkpoint"):
        convert_checkpoint(str(quantized), str(tmp_path / "out"), suffix="a", dtype="float16")
    result = convert_checkpoint(str(quantized), str(tmp_path / "out"), suffix="a")
    with open_tensors(result.tensors_uri) as reader:
        assert reader.record.dtype == "bfloat16+float8_e4m3fn"
        assert dict(reader.items())[name].dtype == torch.float8_e4m3fn


def test_missing_shard_is_named_and_nothing_is_written(tiny_llama, tmp_path):
    source = tmp_path / "sharded"
    source.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (source / name).write_bytes((tiny_llama / name).read_bytes())
    (source / "model-00001-of-00002.safetensors").write_bytes(
        (tiny_llama / "model.safetensors").read_bytes()
    )
    (source / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    with pytest.raises(StorageError, match="model-00002-of-00002.safetensors .*missing"):
        convert_checkpoint(str(source), str(tmp_path / "out"), suffix="v1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batch_bytes", [None, 1000])
def test_a_tensor_in_two_files_is_named_and_nothing_is_written(
    tiny_llama, tmp_path, monkeypatch, batch_bytes
):
    # A stray file beside the weights (no index) holding a tensor the checkpoint has: one
    # copy was kept silently when both fell in one write batch, else tensorizer's bare
    # "Conflicting tensor paths" error came after most of the file was written.
    from safetensors.torch import save_file

    from tensorize_vllm_model.core.errors import FormatError
    from tensorize_vllm_model.format import writer

    if batch_bytes is not None:
        monkeypatch.setattr(writer, "BATCH_BYTES", batch_bytes)
    source = tmp_path / "stray"
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (source / name).write_bytes((tiny_llama / name).read_bytes())
    norm = load_file(str(tiny_llama / "model.safetensors"))["model.norm.weight"]
    save_file({"model.norm.weight": norm * 2}, str(source / "extra.safetensors"))
    with pytest.raises(FormatError, match=r"model\.norm\.weight .*extra\.safetensors"):
        convert_checkpoint(str(source), str(tmp_path / "out"), suffix="v1")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_tensors_is_refused_and_nothing_is_written(tiny_llama, tmp_path):
    # Both were converted into a model.tensors of 0 tensors, refused only at load time.
    from safetensors.torch import save_file

    from tensorize_vllm_model.core.errors import FormatError

    nested, empty = tmp_path / "nested", tmp_path / "empty"
    for source in (nested, empty):
        source.mkdir()
        (source / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    state = load_file(str(tiny_llama / "model.safetensors"))
    torch.save({"model": state, "step": 10}, nested / "pytorch_model.bin")
    save_file({}, str(empty / "model.safetensors"))
    with pytest.raises(FormatError, match=r"pytorch_model.bin holds a nested dict under 'model'"):
        convert_checkpoint(str(nested), str(tmp_path / "out"), suffix="v1")
    with pytest.raises(FormatError, match=r"empty holds no tensors \(model.safetensors\)"):
        convert_checkpoint(str(empty), str(tmp_path / "out"), suffix="v1")
    assert not (tmp_path / "out").exists()


def test_a_hub_id_downloads_only_the_weights_convert_reads(tiny_llama, tmp_path, monkeypatch):
    # The whole repository was downloaded (allow_patterns=None): original/*.pth,
    # consolidated.safetensors and the other format too, twice the bytes or more for
    # many Hub models. No Hub can be reached here: the three huggingface_hub calls are
    # stand-ins that answer as the Hub would, the snapshot being a local copy.
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (snapshot / name).write_bytes((tiny_llama / name).read_bytes())
    shard = "model-00001-of-00001.safetensors"
    (snapshot / shard).write_bytes((tiny_llama / "model.safetensors").read_bytes())
    index = snapshot / "model.safetensors.index.json"
    names = load_file(str(tiny_llama / "model.safetensors"))
    index.write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    repo = ["config.json", "tokenizer.json", index.name, shard, "consolidated.safetensors"]
    repo += ["pytorch_model.bin", "original/consolidated.00.pth", "original/params.json"]
    asked = {}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda model, revision: repo)
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda model, name, **_: str(snapshot / name)
    )

    def snapshot_download(model, *, revision, cache_dir, allow_patterns):
        asked.update(model=model, revision=revision, patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = convert_checkpoint("org/tiny", str(tmp_path / "out"), suffix="v1", revision="r1")
    assert result.tensors == len(names)
    assert asked["model"] == "org/tiny" and asked["revision"] == "r1"
    assert {shard, index.name} <= set(asked["patterns"])
    fetched = [n for n in repo if any(fnmatch.fnmatch(n, p) for p in asked["patterns"])]
    assert not {"consolidated.safetensors", "pytorch_model.bin"} & set(fetched)
    assert not [n for n in fetched if n.endswith(".pth")]


def test_load_into_module_gives_a_transformers_model_the_checkpoint(converted, tiny_llama):
    # The tiled weights were refused as "missing from the file" and "wrong shape: file
    # (8, 256, 64), model (256, 512)": a converted file is the checkpoint, not vLLM's
    # parameters, and loads into the checkpoint's own model.
    import transformers

    from tensorize_vllm_model import load_into_module
    from tensorize_vllm_model.read.modules import meta_parameters

    config = transformers.AutoConfig.from_pretrained(str(tiny_llama))
    with meta_parameters("cpu"):
        model = transformers.LlamaForCausalLM(config)
    with open_tensors(str(converted / "model.tensors")) as reader:
        assert reader.record.column_tiles  # row-parallel weights are stored in tiles
        load_into_module(model, reader)
    original = load_file(str(tiny_llama / "model.safetensors"))
    state = model.state_dict()
    assert set(original) <= set(state)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name


def test_a_tensor_vllm_refuses_is_named_with_its_shape_in_the_file(converted):
    # vLLM's merged q/k/v loader refuses a tensor of another shape with a bare
    # "AssertionError: "; the loader's message gives the tensor's shape in the file.
    # vLLM's own weight loader runs here on the meta input, outside an engine.
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    from tensorize_vllm_model.core.errors import ModelMismatchError
    from tensorize_vllm_model.integrations.vllm.loader import _naming_tensor

    watch = CopyWatch()
    name = "model.layers.0.self_attn.q_proj.weight"
    with (
        open_tensors(str(converted / "model.tensors")) as reader,
        pytest.raises(ModelMismatchError) as info,
        _naming_tensor(reader, watch),
        watch,
    ):
        default_weight_loader(
            torch.empty(256, 256, dtype=torch.bfloat16),
            watch.meta_input(name, (256, 128), torch.bfloat16),
        )
    assert (
        f"tensor {name} (shape [256, 128] in the file) was refused by vLLM's LlamaForCausalLM"
        in str(info.value)
    )


def test_a_failed_convert_leaves_the_earlier_one(converted, tiny_llama, tmp_path):
    source = tmp_path / "broken"
    source.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (source / name).write_bytes((tiny_llama / name).read_bytes())
    (source / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    out = converted.parent.parent.parent
    before = {p.name: p.read_bytes() for p in converted.iterdir()}
    os.rename(source, source.parent / "tiny-llama")
    with pytest.raises(Exception, match="model.safetensors"):
        convert_checkpoint(str(source.parent / "tiny-llama"), str(out), suffix="v1")
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before


def test_cli_refusals(capsys, tmp_path):
    code = main(
        ["--model", str(tmp_path / "absent"), "convert", "--serialized-directory", str(tmp_path)]
    )
    assert code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --model {tmp_path / 'absent'}: no such directory"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert (
        main(
            [
                "--model",
                str(tmp_path / "empty"),
                "convert",
                "--serialized-directory",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "holds no weights" in capsys.readouterr().err


# -- the read plan without an engine ---------------------------------------------------------


def llama_shapes(layers=32, hidden=4096, heads=32, kv_heads=8, inter=14336, vocab=128256):
    """The tensors of a Llama-3-8B-shaped checkpoint (bfloat16), as the converter stores
    them."""
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return [TensorShape(n, s, 2, column_tiles(n, s)) for n, s in shapes]


LLAMA_CONFIG = {"num_attention_heads": 32, "num_key_value_heads": 8}


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_rank_covers_each_tensor_exactly_once(tp):
    tensors = llama_shapes(layers=2)
    plans = [{r.name: r for r in rank_reads(tensors, LLAMA_CONFIG, tp, rank)} for rank in range(tp)]
    for t in tensors:
        dim = split_dim(t.name, t.shape) if tp > 1 else None
        if dim is None:  # replicated: each rank reads it whole, once
            assert all((p[t.name].start, p[t.name].stop) == (0, t.bytes) for p in plans)
            continue
        pieces = sorted(p[t.name].elements for p in plans)
        # the ranks' shares of the split dimension tile it with no gap and no overlap
        assert pieces[0][0] == 0 and pieces[-1][1] == t.shape[dim], t.name
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), t.name
        for p in plans:  # and each share is one contiguous byte range of its rows
            row = t.bytes // t.shape[dim]
            lo, hi = p[t.name].elements
            assert (p[t.name].start, p[t.name].stop) == (lo * row, hi * row)


@pytest.mark.parametrize("tp,most", [(2, 0.6), (4, 0.35), (8, 0.2)])
def test_bytes_each_rank_reads_meet_the_targets(tp, most):
    tensors = llama_shapes()
    total = sum(t.bytes for t in tensors)
    for rank in range(tp):
        read = sum(r.stop - r.start for r in rank_reads(tensors, LLAMA_CONFIG, tp, rank))
        assert read / total <= most
        assert read / total >= 1 / tp  # no rank reads less than its share


# -- what vLLM's weight loaders copy, and reading only that ----------------------------------


def test_view_box_and_byte_range():
    assert view_box((8, 6), 24, (4, 6), (6, 1)) == ((4, 8), (0, 6))
    assert view_box((8, 6), 3, (8, 3), (6, 1)) == ((0, 8), (3, 6))
    assert view_box((8, 6), 0, (48,), (1,)) is None  # a flattened view is no box
    # columns 3..5 of a [8, 6] weight stored in 2 column tiles ([2, 8, 3]): tile 1
    assert box_byte_range([((0, 8), (3, 6))], (8, 6), 2, tiles=2) == (8 * 3 * 2, 2 * 8 * 3 * 2)
    # columns 2..3 straddle both tiles: both are read
    assert box_byte_range([((0, 8), (2, 4))], (8, 6), 2, tiles=2) == (0, 2 * 8 * 3 * 2)
    assert box_byte_range([((4, 8), (0, 6))], (8, 6), 4) == (24 * 4, 48 * 4)


def test_copy_watch_records_what_a_weight_loader_copies():
    row_parallel = torch.empty(8, 3)
    column_parallel = torch.empty(4, 6)
    cast = torch.empty(4, 6, dtype=torch.float64)
    watch = CopyWatch()
    with watch:
        row_parallel.copy_(watch.meta_input("o", (8, 6), torch.float32).narrow(1, 3, 3))
        column_parallel.copy_(watch.meta_input("q", (8, 6), torch.float32).narrow(0, 4, 4))
        cast.copy_((watch.meta_input("c", (8, 6), torch.float32) * 2).narrow(0, 0, 4))
        # a meta input inside a list argument, with a real tensor (aten.cat's tensors)
        joined = torch.cat([watch.meta_input("j", (2, 6), torch.float32), torch.ones(2, 6)])
        column_parallel.copy_(joined)
        watch.meta_input("other_stage", (8, 6), torch.float32)
    needs = watch.needs
    assert needs["o"].boxes == [((0, 8), (3, 6))] and not needs["o"].whole
    assert needs["q"].boxes == [((4, 8), (0, 6))]
    # the parameter memory each copy wrote to: where the loader reads straight into
    [(_, written)] = needs["q"].copies
    assert written.data_ptr() == column_parallel.data_ptr()
    assert needs["c"].whole  # not a plain view of the input: read it all
    assert needs["j"].whole
    assert not needs["other_stage"].needed


@pytest.mark.parametrize("encrypted", [False, True])
def test_partial_reads_read_only_the_range(tmp_path, encrypted):
    from tensorize_vllm_model import TensorizerConfig
    from tensorize_vllm_model.format.keys import generate_key, write_key
    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors
    from tensorize_vllm_model.read.decrypt import ciphers

    weight = torch.arange(5 * 2**20 // 4 * 4, dtype=torch.float32).reshape(-1, 1024)  # 20 MiB
    key = generate_key() if encrypted else None
    path = str(tmp_path / "model.tensors")
    write_tensors(path, [("w", weight, False)], record=FileRecord(), key=key).commit()
    config = TensorizerConfig(tensorizer_uri=path)
    if key:
        write_key(str(tmp_path / "key"), key)
        config.encryption_keyfile = str(tmp_path / "key")
    with open_tensors(path, config=config) as reader:
        entry = reader.index["w"]
        cipher = ciphers(path, [entry], reader.header_deserializer)[0] if key else None
    row = 1024 * 4
    part = Part("w", entry, 1000 * row, 1500 * row, cipher)
    stats = PartsRead()
    [(_, buffer)] = list(read_parts(path, [part], threads=2, stats=stats))
    got = buffer.view(torch.float32).reshape(weight.shape)[1000:1500]
    assert torch.equal(got, weight[1000:1500])
    if key:  # whole 2 MiB chunks around the range
        assert stats.bytes == 4 << 20 and part.span == (2 << 20, 6 << 20)
    else:
        assert stats.bytes == 500 * row
    # Into the parameters, with no buffer of the part: cast (float32 -> float64, as
    # copy_ does), and of a tensor in column tiles, whole tiles into its columns: the
    # [5120, 1024] stored tensor read as 5 tiles of a [1024, 5120] weight, tiles 1 and 2
    # (4 MiB each) into columns 1024..3071.
    cast = torch.empty(500, 1024, dtype=torch.float64)
    columns = torch.empty(1024, 2048, dtype=torch.float32)
    lo, hi = 1000 * row, 1500 * row
    tile = 1024 * row
    parts = [
        Part("w", entry, lo, hi, cipher, ((lo, hi, cast),), torch.float32),
        Part(
            "w", entry, tile, 3 * tile, cipher, ((tile, 3 * tile, columns),), torch.float32,
            tiles=5, shape=(1024, 5120),
        ),
    ]  # fmt: skip
    stats = PartsRead()
    assert [b for _, b in read_parts(path, parts, threads=2, stats=stats)] == [None, None]
    assert torch.equal(cast, weight[1000:1500].double())
    logical = weight.view(5, 1024, 1024).permute(1, 0, 2).reshape(1024, 5120)
    assert torch.equal(columns, logical[:, 1024:3072])
    assert stats.bytes == ((4 << 20) + (8 << 20) if key else 500 * row + (8 << 20))


def test_layout_the_model_does_not_allow():
    config = {"num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2}
    check_layout_fits(config, 2, 2, source="m")
    with pytest.raises(
        LayoutError, match="4 attention heads are not divisible by --tensor-parallel-size 3"
    ):
        check_layout_fits(config, 3, 1, source="m")
    with pytest.raises(LayoutError, match="2 layers cannot fill --pipeline-parallel-size 4"):
        check_layout_fits(config, 1, 4, source="m")


def test_a_converted_load_reports_the_bytes_of_its_share(converted):
    """The load's progress (the reader's ``on_bytes``): resized to the bytes this rank reads
    and advanced by each part read, as the vLLM loader's bar shows them."""
    import io

    from tensorize_vllm_model import TensorizerConfig
    from tensorize_vllm_model.convert.loading import ConvertedFile
    from tensorize_vllm_model.core.progress import progress

    path = str(converted / "model.tensors")
    lines = io.StringIO()
    with (
        open_tensors(path) as reader,
        progress(
            "Deserializing", reader.total_tensor_bytes, stream=lines, min_bytes=0, log_every=0
        ) as reader.on_bytes,
    ):
        file = ConvertedFile(reader, path, TensorizerConfig(tensorizer_uri=path), threads=2)
        parts = [
            Part(e.name, reader.index[e.name], 0, reader.index[e.name].data_length // 2)
            for e in reader.entries()
        ]
        share = sum(p.stop - p.start for p in parts)
        assert share < reader.total_tensor_bytes
        names = [name for name, _ in file.tensors(parts, PartsRead())]
    assert names == [p.name for p in parts]
    shown = lines.getvalue().splitlines()
    assert shown and all(f" of {share / 1e9:.2f} GB" in line for line in shown)
    assert shown[-1].startswith(f"Deserializing: {(share - (parts[-1].stop)) / 1e9:.2f} of")


def test_batched_write_groups_and_hands_on_errors(tmp_path):
    """`format.writer`: batches of at least the batch size, in order; an error of the tensor
    source (raised on the prefetch thread) reaches the caller and nothing is published."""
    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import batches, write_tensors

    tensors = [(f"t{i}", torch.zeros(i + 1, dtype=torch.uint8)) for i in range(5)]
    assert [[n for n, _ in g] for g in batches(tensors, 3)] == [
        ["t0", "t1"],
        ["t2"],
        ["t3"],
        ["t4"],
    ]

    def source():
        yield "a", torch.ones(1000), False
        yield "b", torch.ones(1000), False
        raise ValueError("checkpoint tensor c is unreadable")

    path = tmp_path / "model.tensors"
    with pytest.raises(ValueError, match="tensor c is unreadable"):
        write_tensors(str(path), source(), record=FileRecord(), marker=False, batch_bytes=4000)
    assert os.listdir(tmp_path) == []
    staged = write_tensors(
        str(path),
        iter([("a", torch.arange(1000.0), False)] * 1),
        record=FileRecord(),
        marker=False,
        batch_bytes=1,
    )
    staged.commit()
    with open_tensors(str(path)) as reader:
        assert torch.equal(dict(reader.items())["a"], torch.arange(1000.0))


def _convert_cli(capsys, tiny_llama, out, key):
    code = main(
        [
            "--model",
            str(tiny_llama),
            "convert",
            "--serialized-directory",
            str(out),
            "--suffix",
            "k",
            "--keyfile",
            str(key),
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _decrypted(tensors, key) -> dict:
    from tensorize_vllm_model.config import TensorizerConfig

    config = TensorizerConfig(tensorizer_uri=str(tensors), encryption_keyfile=str(key))
    with open_tensors(str(tensors), config=config) as reader:
        return dict(reader.items())


def test_convert_encrypts_with_an_existing_key_and_leaves_it(
    capsys, restore_signal_handlers, tiny_llama, tmp_path
):
    from tensorize_vllm_model.format.keys import generate_key, write_key

    key = tmp_path / "key"
    write_key(str(key), generate_key())
    before = (key.read_bytes(), key.stat().st_ino, key.stat().st_mtime_ns)
    code, out, err = _convert_cli(capsys, tiny_llama, tmp_path / "out", key)
    assert code == 0, err
    assert f"encrypting with the existing key in {key}" in out
    assert f"encrypted with the existing key in {key} (left unchanged)" in out
    assert (key.read_bytes(), key.stat().st_ino, key.stat().st_mtime_ns) == before
    tensors = tmp_path / "out" / "vllm" / "tiny-llama" / "k" / "model.tensors"
    original = load_file(str(tiny_llama / "model.safetensors"))
    got = _decrypted(tensors, key)
    name = "model.embed_tokens.weight"
    assert torch.equal(got[name], original[name])


def test_convert_writes_a_new_key_where_no_file_is(
    capsys, restore_signal_handlers, tiny_llama, tmp_path
):
    key = tmp_path / "new.key"
    code, out, err = _convert_cli(capsys, tiny_llama, tmp_path / "out", key)
    assert code == 0, err
    assert f"key saved to {key} (mode 0600)" in out
    assert len(key.read_bytes()) == 32 and key.stat().st_mode & 0o777 == 0o600
    tensors = tmp_path / "out" / "vllm" / "tiny-llama" / "k" / "model.tensors"
    assert "model.norm.weight" in _decrypted(tensors, key)
    # without the key the record stays encrypted, and inspect says so (not "not recorded")
    assert main(["inspect", str(tensors)]) == 0
    out = capsys.readouterr().out
    assert "parallel layout: unknown (the file's record is encrypted: give --keyfile)" in out
    assert main(["inspect", str(tensors), "--keyfile", str(key)]) == 0
    assert "parallel layout: any (checkpoint form" in capsys.readouterr().out


def test_convert_refuses_a_file_that_is_not_a_key_before_writing(
    capsys, restore_signal_handlers, tiny_llama, tmp_path
):
    key = tmp_path / "notes.txt"
    key.write_bytes(b"my notes\n")
    code, out, err = _convert_cli(capsys, tiny_llama, tmp_path / "out", key)
    assert code == 2
    assert err.startswith(f"error: the key file {key} holds 9 bytes"), err
    assert key.read_bytes() == b"my notes\n"
    assert not (tmp_path / "out").exists()  # no empty destination directories either


def test_failed_convert_leaves_no_empty_directories(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="--serialization-kwargs: limit_cpu_concurrency"):
        convert_checkpoint(
            str(tiny_llama),
            str(tmp_path / "out"),
            suffix="f",
            serialization_kwargs={"limit_cpu_concurrency": "bad"},
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verify_hash", [True, False])
def test_converted_reader_checks_hashes_of_whole_tensors(converted, tmp_path, verify_hash):
    """verify_hash: a rank needing only some rows of a tensor still gets the whole tensor
    checked, and a flipped bit outside those rows is reported naming the tensor."""
    from tensorize_vllm_model import TensorizerConfig
    from tensorize_vllm_model.convert.loading import ConvertedFile
    from tensorize_vllm_model.convert.regions import Need
    from tensorize_vllm_model.core.errors import CorruptTensorError

    path = tmp_path / "model.tensors"
    path.write_bytes((converted / "model.tensors").read_bytes())
    name = "model.embed_tokens.weight"
    with open_tensors(str(path)) as reader:
        entry = reader.index[name]
        shape = tuple(reader.index[name].shape)
    data = bytearray(path.read_bytes())
    data[entry.data_offset + entry.data_length - 1] ^= 0x01  # in the last row
    path.write_bytes(bytes(data))
    config = TensorizerConfig(tensorizer_uri=str(path), verify_hash=verify_hash)
    need = Need(name, shape, boxes=[((0, 1), (0, shape[1]))])  # the first row only
    with open_tensors(str(path)) as reader:
        file = ConvertedFile(reader, str(path), config, threads=2)
        parts = file.parts({name: need})
        if verify_hash:
            with pytest.raises(CorruptTensorError, match=rf"tensor {name} failed its hash check"):
                list(file.tensors(parts, PartsRead()))
        else:
            assert [n for n, _ in file.tensors(parts, PartsRead())] == [name]


@contextlib.contextmanager
def _narrowed_part(converted, name, parameter, start, length):
    """As a row-parallel weight loader: columns [start, start + length) of checkpoint
    tensor `name` copied into `parameter`, watched on meta; yields (the open
    `ConvertedFile`, the one `Part` its read plan makes)."""
    from tensorize_vllm_model import TensorizerConfig
    from tensorize_vllm_model.convert.loading import ConvertedFile

    path = str(converted / "model.tensors")
    with open_tensors(path) as reader:
        file = ConvertedFile(reader, path, TensorizerConfig(tensorizer_uri=path), threads=2)
        watch = CopyWatch()
        with watch:
            stored = watch.meta_input(name, file.logical_shape(name), torch.bfloat16)
            parameter.copy_(stored.narrow(1, start, length))
        [part] = file.parts(watch.needs)
        yield file, part


def test_a_tiled_weight_goes_into_its_parameter_cast_without_a_buffer(converted, tiny_llama):
    """As vLLM's row-parallel weight loader at TP=2, rank 1 (narrow the input dimension,
    copy into a float32 parameter): the column tiles of rank 1's half go into the
    parameter's columns, cast piece by piece; nothing is handed back to load_weights."""
    name = "model.layers.1.self_attn.o_proj.weight"
    original = load_file(str(tiny_llama / "model.safetensors"))[name]
    out, inputs = original.shape
    parameter = torch.empty(out, inputs // 2, dtype=torch.float32)
    with _narrowed_part(converted, name, parameter, inputs // 2, inputs // 2) as (file, part):
        assert part.tiles == 8 and part.shape == (out, inputs)
        assert [t for _, _, t in part.targets] == [parameter]
        read = PartsRead()
        assert list(file.tensors([part], read)) == []  # load_weights gets nothing back
    assert torch.equal(parameter, original[:, inputs // 2 :].float())
    assert read.bytes == original.numel() // 2 * 2  # rank 1's half of the bfloat16 bytes


def test_a_tiled_weight_goes_into_a_column_major_parameter(converted, tiny_llama):
    """A parameter whose rows are not runs of elements (here a transposed view) cannot take
    a tile's rows straight from the file: the tiles go through a buffer and ``copy_`` puts
    them in, instead of failing in the read (found in review: RuntimeError 'self.stride(-1)
    must be 1 to view BFloat16 as Byte')."""
    name = "model.layers.0.mlp.down_proj.weight"
    original = load_file(str(tiny_llama / "model.safetensors"))[name]
    out, inputs = original.shape
    half = inputs // 2
    parameter = torch.empty(half, out, dtype=torch.bfloat16).t()
    with _narrowed_part(converted, name, parameter, half, half) as (file, part):
        [(got, tensor)] = list(file.tensors([part], PartsRead()))
        parameter.copy_(tensor[:, half:])
    assert got == name
    assert torch.equal(parameter, original[:, half:])


def test_columns_across_tiles_are_handed_to_load_weights_in_checkpoint_shape(converted, tiny_llama):
    """A copy whose columns do not start and end on tiles (a layout no TP of 1, 2, 4 or 8
    makes) cannot go straight into the parameter: the tiles holding those columns are read
    and load_weights gets the checkpoint's [out, in] tensor, those columns put back."""
    name = "model.layers.0.mlp.down_proj.weight"
    original = load_file(str(tiny_llama / "model.safetensors"))[name]
    out, inputs = original.shape
    width = inputs // 8
    first, count = width + 3, 2 * width  # tiles 1, 2 and 3
    parameter = torch.empty(out, count, dtype=torch.bfloat16)
    with _narrowed_part(converted, name, parameter, first, count) as (file, part):
        assert not part.targets and (part.start, part.stop) == (
            width * out * 2,
            4 * width * out * 2,
        )
        read = PartsRead()
        [(got, tensor)] = list(file.tensors([part], read))
    assert got == name and tensor.shape == (out, inputs)
    assert torch.equal(tensor[:, first : first + count], original[:, first : first + count])
    assert read.bytes == 3 * width * out * 2


def test_a_file_converted_with_transposed_weights_is_refused(tmp_path, capsys):
    """Files converted before column tiles (row-parallel weights stored transposed) are
    refused at load, naming the file and what to do."""
    from tensorize_vllm_model import TensorizerConfig
    from tensorize_vllm_model.convert.loading import ConvertedFile
    from tensorize_vllm_model.core.errors import FormatError
    from tensorize_vllm_model.format.record import CHECKPOINT_FORM, FileRecord
    from tensorize_vllm_model.format.writer import write_tensors

    path = str(tmp_path / "model.tensors")
    record = FileRecord(extra={"form": CHECKPOINT_FORM, "transposed": ["l.o_proj.weight"]})
    write_tensors(
        path, [("l.o_proj.weight", torch.ones(4, 2), False)], record=record, marker=False
    ).commit()
    with open_tensors(path) as reader, pytest.raises(FormatError) as raised:
        ConvertedFile(reader, path, TensorizerConfig(tensorizer_uri=path), threads=1)
    assert str(raised.value) == (
        f"{path} was converted by an earlier tensorize_vllm_model, which stored "
        "row-parallel weights transposed; convert the checkpoint again"
    )
    assert main(["inspect", path]) == 0  # inspect says so too
    assert "loads refuse it; convert the checkpoint again" in capsys.readouterr().out


def test_tiles_read_straight_into_columns_stop_at_a_truncated_file(tmp_path):
    """Rows of column tiles read straight into a parameter's columns (local, plain) from a
    file cut short: a FormatError naming the file and the tensor, not a short tensor."""
    from tensorize_vllm_model.core.errors import FormatError
    from tensorize_vllm_model.format.record import FileRecord
    from tensorize_vllm_model.format.writer import write_tensors

    tiles = torch.arange(4 * 64 * 32, dtype=torch.float32).reshape(4, 64, 32)
    path = tmp_path / "model.tensors"
    write_tensors(str(path), [("w", tiles, False)], record=FileRecord()).commit()
    with open_tensors(str(path)) as reader:
        entry = reader.index["w"]
    columns = torch.empty(64, 128, dtype=torch.float32)
    size = entry.data_length
    part = Part("w", entry, 0, size, None, ((0, size, columns),), torch.float32, 4, (64, 128))
    [(_, buffer)] = list(read_parts(str(path), [part], threads=2))
    assert buffer is None and torch.equal(columns, tiles.permute(1, 0, 2).reshape(64, 128))
    os.truncate(path, entry.data_offset + size - 100)
    with pytest.raises(
        FormatError, match=rf"{path} is truncated: tensor w ends past the end of the file"
    ):
        list(read_parts(str(path), [part], threads=2))


def test_a_converted_file_on_a_server_without_ranges_is_named(converted, web_root, web_servers):
    """Each rank reads only its parts of a converted file, by byte ranges: a server that
    does not serve them gets one clear error naming the file, not retries of a "dropped
    connection"."""
    import shutil
    import uuid

    name = f"converted-{uuid.uuid4().hex}.tensors"
    shutil.copyfile(converted / "model.tensors", web_root / name)
    url = f"{web_servers['http-1.0-no-ranges'].url}/{name}"
    with open_tensors(str(converted / "model.tensors")) as reader:
        entry = reader.index["model.norm.weight"]
    part = Part("model.norm.weight", entry, 0, entry.data_length)
    with pytest.raises(StorageError) as raised:
        list(read_parts(url, [part], threads=2))
    assert str(raised.value) == (
        f"cannot read {url}: the server does not serve byte ranges (HTTP Range requests), "
        "which loading a converted file needs (each rank reads only its parts); serve it "
        "from a server that does, or download it and load the local copy"
    )
