"""One declaration per option (replica.options): an engine option declared once in EngineConfig
reaches both CLIs, the Serve app's args and the engine; its defaults are decided in one place
(EngineConfig.resolved). No Ray cluster, no model."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.app import AppOptions, engine_options_model
from cluster.serve_cli import add_serve_command, app_options
from replica import cli as replica_cli
from replica import engine_config
from replica.engine_config import (
    ACTIVATION_RESERVE_BYTES,
    HOST_KV_CACHE_BYTES,
    HOST_TIER_MAX_BYTES,
    DeviceFacts,
    EngineConfig,
    host_memory_bytes,
)
from replica.kv.config import KVLayout
from replica.options import add_option_arguments, declared_options, option, option_values
from replica.sampling_params import default_max_tokens
from tests.helpers import modules_loaded_by

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@dataclass(frozen=True)
class KnobConfig(EngineConfig):
    """The engine's declaration with one more option, as a maintainer would add it."""

    knob_tokens: int = option(3, "a knob that exists only in this test")


class KnobOptions(AppOptions, engine_options_model(KnobConfig)):  # type: ignore[misc]
    engine_declaration = KnobConfig


def serve_parser(declaration: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vattn")
    add_serve_command(parser.add_subparsers(dest="command"), declaration)
    return parser


def test_an_option_declared_once_reaches_the_clis_the_app_args_and_the_engine() -> None:
    # vattn generate (replica.cli): the flag, its help and default, and the engine config.
    parser = argparse.ArgumentParser()
    add_option_arguments(parser, KnobConfig)
    assert "a knob that exists only in this test (default: 3)" in parser.format_help()
    args = parser.parse_args(["--knob-tokens", "5", "--backend", "sdpa"])
    config = KnobConfig(**option_values(args, KnobConfig))
    assert (config.knob_tokens, config.attention) == (5, "sdpa")
    assert KnobConfig(**option_values(parser.parse_args([]), KnobConfig)) == KnobConfig()

    # vattn serve: the flag becomes an app arg, and the app's engine config carries it.
    args = serve_parser(KnobConfig).parse_args(["serve", "--knob-tokens", "6", "--tp", "2"])
    options = app_options(args, KnobOptions)
    assert (options.knob_tokens, options.tp, options.replicas) == (6, 2, 1)
    engine = options.engine_config()
    assert (engine["knob_tokens"], engine["tensor_parallel_size"], engine["device"]) == (
        6,
        2,
        "cpu",
    )
    assert KnobConfig(**engine).knob_tokens == 6  # what the replica deployment builds

    # serve run cluster.app:build_app knob_tokens=7 (Serve passes strings): coerced and checked.
    assert KnobOptions.model_validate({"knob_tokens": "7"}).engine_config()["knob_tokens"] == 7
    assert KnobOptions.model_json_schema()["properties"]["knob_tokens"]["description"] == (
        "a knob that exists only in this test"
    )
    with pytest.raises(ValidationError, match="valid integer"):
        KnobOptions.model_validate({"knob_tokens": "many"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        AppOptions.model_validate({"knob_tokens": "7"})  # the real declaration has no such knob


def test_the_flags_and_app_args_users_rely_on_keep_their_names() -> None:
    flags = {"--model", "--dtype", "--kv-cache-dtype", "--device", "--backend", "--kv-layout"}
    flags |= {"--kv-cache-bytes", "--page-size", "--max-model-len", "--max-running", "--tp"}
    flags |= {"--no-prefix-cache", "--growth-reserve"}
    generate = argparse.ArgumentParser(prog="vattn")
    replica_cli.add_commands(generate.add_subparsers(dest="command"))
    for parser, argv in ((generate, ["generate", "hi"]), (serve_parser(EngineConfig), ["serve"])):
        [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        command = commands.choices[argv[0]]
        assert flags <= set(command._option_string_actions), argv
        args = parser.parse_args(argv)
        assert EngineConfig(**option_values(args, EngineConfig)) == EngineConfig(), argv
    app_args = {"model", "tp", "backend", "kv_layout", "kv_cache_dtype", "device"}
    app_args |= {"max_model_len", "max_running", "kv_cache_bytes", "page_size"}
    app_args |= {"growth_reserve", "prefix_cache"}
    assert app_args <= set(AppOptions.model_fields)
    assert {spec.name for spec in declared_options(EngineConfig)} <= set(AppOptions.model_fields)


def test_the_app_refuses_what_the_engine_refuses_before_ray_starts() -> None:
    with pytest.raises(ValidationError, match="kv_layout must be one of auto, interleaved"):
        AppOptions.model_validate({"kv_layout": "diagonal"})
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        AppOptions.model_validate({"device": "gpu"})
    with pytest.raises(ValidationError, match="tensor_parallel_size must be positive"):
        AppOptions.model_validate({"tp": "0"})
    assert AppOptions.model_validate({"device": "cuda:1", "kv_layout": "per_layer"}).tp == 1


def test_every_default_is_decided_by_resolved() -> None:
    # SmolLM2-135M's shapes: 30 layers, 3 KV heads of 64 float32 elements.
    cpu = DeviceFacts(cuda=False, free_bytes=0, layer_token_bytes=3 * 64 * 4, num_layers=30)
    gpu = DeviceFacts(cuda=True, free_bytes=80 << 30, layer_token_bytes=3 * 64 * 2, num_layers=30)
    on_cpu = EngineConfig().resolved(cpu)
    assert (on_cpu.max_running, on_cpu.max_batch_tokens) == (64, 512)
    assert on_cpu.kv_cache_bytes == HOST_KV_CACHE_BYTES
    assert on_cpu.page_size == 2_027_520  # 44 whole tokens of 46,080 bytes
    per_layer = EngineConfig(kv_layout="per_layer").resolved(cpu)
    assert per_layer.page_size == 2_088_960  # 2,720 whole tokens of one layer's 768-byte K
    on_gpu = EngineConfig().resolved(gpu)
    assert (on_gpu.max_running, on_gpu.max_batch_tokens, on_gpu.page_size) == (256, 8192, 2 * MIB)
    assert on_gpu.kv_cache_bytes == int((80 << 30) * 0.85) - ACTIVATION_RESERVE_BYTES
    given = EngineConfig(
        max_running=8,
        kv_cache_bytes=1000,
        page_size=4096,
        kv_layout="per_layer",
        kv_offload_bytes=3000,
    )
    assert given.resolved(gpu) == EngineConfig(
        max_running=8,
        max_batch_tokens=8192,
        kv_cache_bytes=1000,
        page_size=4096,
        kv_layout=KVLayout.PER_LAYER,
        admission_map_wait_s=0.005,
        kv_offload_bytes=3000,
    )
    # Admission waits for its maps up to 5 ms on a GPU, always on a CPU (host maps take us).
    assert on_cpu.admission_map_wait_s == math.inf
    # Premapped slots are off unless asked for; the host tier is on on a GPU, a share of the
    # host memory this process may use (test_the_host_tier_is_a_share_of_the_node), off on a CPU.
    assert (on_gpu.kv_premap, on_cpu.kv_offload_bytes) == (False, 0)
    assert on_gpu.kv_offload_bytes is not None
    assert 0 < on_gpu.kv_offload_bytes <= min(64 << 30, host_memory_bytes() // 4)
    with pytest.raises(ValueError, match="kv_offload_bytes"):
        EngineConfig(kv_offload_bytes=-1)
    # vattn generate's --max-running leaves the choice to the engine (it was 64 everywhere).
    args = argparse.ArgumentParser()
    add_option_arguments(args, EngineConfig)
    assert replica_cli.engine_config(args.parse_args([])).resolved(gpu).max_running == 256


GIB = 1 << 30
#: SmolLM2-135M's shapes on a GPU, as test_every_default_is_decided_by_resolved has them.
GPU = DeviceFacts(cuda=True, free_bytes=80 << 30, layer_token_bytes=3 * 64 * 2, num_layers=30)
CPU = DeviceFacts(cuda=False, free_bytes=0, layer_token_bytes=3 * 64 * 4, num_layers=30)


def tier(monkeypatch: pytest.MonkeyPatch, host_gib: int, facts: DeviceFacts, **config: Any) -> int:
    """The host tier ``EngineConfig(**config)`` resolves to where this process may use
    ``host_gib`` GiB of host memory."""
    monkeypatch.setattr(engine_config, "host_memory_bytes", lambda: host_gib * GIB)
    size = EngineConfig(**config).resolved(facts).kv_offload_bytes
    assert size is not None
    return size


def test_the_host_tier_is_a_share_of_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the tier is on by default: a quarter of the host memory times the process's share
    of the node's GPUs, at most 64 GiB; off on a CPU, without prefix sharing, or when set to 0;
    a size given is kept."""
    assert tier(monkeypatch, 128, GPU) == 32 * GIB  # alone on the node (outside Ray)
    assert tier(monkeypatch, 128, GPU, tensor_parallel_size=2) == 16 * GIB  # per rank
    assert tier(monkeypatch, 128, GPU, node_share=1 / 8) == 4 * GIB  # one GPU of 8 (a TP rank)
    assert tier(monkeypatch, 128, GPU, node_share=0.25 / 8) == GIB  # a quarter of one GPU of 8
    assert tier(monkeypatch, 1024, GPU) == HOST_TIER_MAX_BYTES == 64 * GIB  # the cap
    assert tier(monkeypatch, 1024, GPU, node_share=1 / 8) == 32 * GIB
    assert tier(monkeypatch, 128, CPU) == tier(monkeypatch, 128, CPU, node_share=1.0) == 0
    assert tier(monkeypatch, 128, GPU, prefix_cache=False) == 0  # it holds prefix blocks
    assert tier(monkeypatch, 128, GPU, kv_offload_bytes=0) == 0  # off
    assert tier(monkeypatch, 128, GPU, kv_offload_bytes=GIB, node_share=1 / 8) == GIB  # kept
    assert tier(monkeypatch, 128, CPU, kv_offload_bytes=GIB) == GIB
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="node_share must be in"):
            EngineConfig(node_share=share)


def test_the_host_tier_default_reaches_the_clis_and_the_app_args() -> None:
    """No flag, no arg: None (the engine's default, decided by ``resolved``); 0 turns it off."""
    spec = {s.field: s for s in declared_options(EngineConfig)}["kv_offload_bytes"]
    assert (spec.default, spec.flag) == (None, "--kv-offload-bytes")
    assert "0 turns it off" in spec.help and "slowed" not in spec.help
    generate = argparse.ArgumentParser()
    add_option_arguments(generate, EngineConfig)
    assert replica_cli.engine_config(generate.parse_args([])).kv_offload_bytes is None
    off = generate.parse_args(["--kv-offload-bytes", "0"])
    assert replica_cli.engine_config(off).kv_offload_bytes == 0
    serve = serve_parser(EngineConfig)
    assert app_options(serve.parse_args(["serve"])).engine_config()["kv_offload_bytes"] is None
    given = app_options(serve.parse_args(["serve", "--kv-offload-bytes", str(GIB)]))
    assert given.engine_config()["kv_offload_bytes"] == GIB
    assert AppOptions().engine_config()["kv_offload_bytes"] is None
    assert (
        AppOptions.model_validate({"kv_offload_bytes": "0"}).engine_config()["kv_offload_bytes"]
        == 0
    )
    assert AppOptions().engine_config()["node_share"] is None  # the replica sets it (Ray's)


def test_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    assert default_max_tokens(4096, 96) == 4000
    assert default_max_tokens(100, 100) == 0  # the ingress refuses it; vattn generate asks for 1


def test_the_declaration_imports_without_torch() -> None:
    imports = "replica.engine_config, replica.options, cluster.serve_cli"
    assert modules_loaded_by(imports, ("torch", "replica._vmm")) == []
