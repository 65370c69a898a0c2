"""The load figures cross ``collective_rpc`` as a typed `LoadStats` message (messages.py),
read_times included, and stay a plain dict on the wire for users' own calls. No engine:
the worker method and `engine.raise_worker_errors` are called in-process, as vLLM's
``collective_rpc`` calls them; a ``json`` round trip stands in for vLLM's msgpack (both carry
plain data only: dicts, lists, numbers, strings)."""

from __future__ import annotations

import json

from tensorize_vllm_model.integrations.vllm.engine import raise_worker_errors
from tensorize_vllm_model.integrations.vllm.messages import decode, encode
from tensorize_vllm_model.integrations.vllm.runtime import STATE
from tensorize_vllm_model.integrations.vllm.worker import WorkerExtension
from tensorize_vllm_model.read.base import LoadStats, ReadTimes

STATS = LoadStats(
    uri="/models/opt/model.tensors",
    tensors=196,
    bytes=250_000_000,
    seconds=0.5,
    read_times=ReadTimes(readers=4, populating=0.25, reading=1.5, decrypting=0.0),
)


def test_load_stats_round_trip_keeps_read_times():
    wire = json.loads(json.dumps(encode(STATS)))  # plain data only, as msgpack carries it
    assert wire["bytes"] == 250_000_000 and wire["read_times"]["reading"] == 1.5
    back = decode(wire)
    assert back == STATS and isinstance(back.read_times, ReadTimes)


def test_load_stats_without_read_times():
    stats = LoadStats(uri="s3://b/m.tensors", tensors=3, bytes=12, seconds=0.1)
    assert decode(json.loads(json.dumps(encode(stats)))) == stats


def test_worker_answers_a_message_and_engine_gets_load_stats(monkeypatch):
    monkeypatch.setattr(STATE, "last_load", STATS)
    answer = WorkerExtension.tensorize_vllm_model_load_stats(object())
    assert isinstance(answer, dict) and answer["read_times"]["readers"] == 4
    assert raise_worker_errors([json.loads(json.dumps(answer))]) == [STATS]
    monkeypatch.setattr(STATE, "last_load", None)
    assert WorkerExtension.tensorize_vllm_model_load_stats(object()) is None
