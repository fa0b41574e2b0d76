"""Offline checks of the Kubernetes deployment (k8s/) and the Serve config
(cluster/serve-config.yaml).

No cluster is needed: the RayService is validated against KubeRay's CRD schema and the PodMonitor
against the Prometheus Operator's (both converted to JSON Schema, see tests/data/README.md); the
Serve configs against Ray's own ``ServeDeploySchema``, plus what those schemas let through
(unknown keys, which Kubernetes prunes and Serve ignores) and what they cannot know: that the app
builds from its args, that the router class imports, that the GPU counts agree across the Serve
args, rayStartParams and the pod resources, and that the PodMonitor selects the pods and ports.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DATA = ROOT / "tests" / "data"
RAYSERVICE = K8S / "rayservice.yaml"
PODMONITOR = K8S / "podmonitor.yaml"
CONFIGMAP = K8S / "grafana-dashboard-configmap.yaml"
SERVE_CONFIG = ROOT / "cluster" / "serve-config.yaml"
IMAGE = "vattn:0.1.0"
GPU = "nvidia.com/gpu"
#: The Serve args that may differ between cluster/serve-config.yaml and the RayService's copy.
CLUSTER_ARGS = {"device", "tp", "replicas", "min_replicas", "max_replicas"}
#: KubeRay: a RayService name is a DNS-1035 label of at most 47 characters (53 - 6 for the suffix
#: of its RayCluster's name).
MAX_RAYSERVICE_NAME = 47
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


# ---- loading -------------------------------------------------------------------------------------
def load_one(path: Path) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert len(docs) == 1, f"{path} should hold one document, has {len(docs)}"
    return docs[0]


@functools.cache  # checking a CRD's schema (160 KB) against its metaschema takes seconds
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((DATA / name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(name: str, document: dict[str, Any]) -> list[str]:
    errors = sorted(validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load_one(RAYSERVICE)


@pytest.fixture(scope="module")
def podmonitor() -> dict[str, Any]:
    return load_one(PODMONITOR)


def serve_config_of(rayservice: dict[str, Any]) -> dict[str, Any]:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML document in a string"
    return yaml.safe_load(text)


def serve_configs() -> dict[str, dict[str, Any]]:
    return {
        "cluster/serve-config.yaml": load_one(SERVE_CONFIG),
        "k8s/rayservice.yaml serveConfigV2": serve_config_of(load_one(RAYSERVICE)),
    }


def the_app(config: dict[str, Any]) -> dict[str, Any]:
    [app] = [a for a in config["applications"] if a["name"] == "vattn"]
    return app


def override(app: dict[str, Any], deployment: str) -> dict[str, Any]:
    [options] = [d for d in app.get("deployments", []) if d["name"] == deployment]
    return options


def cluster_spec(rayservice: dict[str, Any]) -> dict[str, Any]:
    return rayservice["spec"]["rayClusterConfig"]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the pod template's first container."""
    return group["template"]["spec"]["containers"][0]


def ports_by_name(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


# ---- checks the schemas cannot make --------------------------------------------------------------
def gpu_count(value: Any) -> int | None:
    """A whole GPU count from a quantity (GPUs are not divisible), None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not re.fullmatch(r"\d+", str(value)):
        raise ValueError(f"{GPU} must be a whole number, got {value!r}")
    return int(value)


def manifest_problems(rayservice: dict[str, Any]) -> list[str]:
    """What KubeRay's and Kubernetes' own validation would refuse, plus vattn's GPU layout."""
    problems: list[str] = []
    name = rayservice.get("metadata", {}).get("name", "")
    if len(name) > MAX_RAYSERVICE_NAME or not DNS1035.fullmatch(name):
        problems.append(
            f"metadata.name {name!r} must be a DNS-1035 label of <= {MAX_RAYSERVICE_NAME} chars"
        )
    spec = cluster_spec(rayservice)
    app_args = the_app(serve_config_of(rayservice))["args"]
    tp = int(app_args.get("tp", 1))
    groups = [("headGroupSpec", spec["headGroupSpec"])]
    groups += [
        (f"workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs", [])
    ]
    for where, group in groups:
        params = group.get("rayStartParams", {})
        for key, value in params.items():
            if not isinstance(value, str):
                problems.append(
                    f"{where}.rayStartParams.{key} must be a quoted string, got {value!r}"
                )
        containers = group["template"]["spec"].get("containers", [])
        if not containers:
            problems.append(f"{where} has no container")
            continue
        for container in containers:
            resources = container.get("resources", {})
            limit = gpu_count(resources.get("limits", {}).get(GPU))
            request = gpu_count(resources.get("requests", {}).get(GPU))
            if limit != request:
                problems.append(
                    f"{where}.{container['name']}: {GPU} limit {limit} and request "
                    f"{request} must both be set, and equal"
                )
        gpus = gpu_count(ray_container(group).get("resources", {}).get("limits", {}).get(GPU)) or 0
        declared = params.get("num-gpus")
        if where == "headGroupSpec":
            if declared != "0" or gpus:
                problems.append(f"the head must hold no GPUs: num-gpus {declared!r}, {GPU} {gpus}")
            continue
        if declared != str(gpus):
            problems.append(
                f"{where}: rayStartParams num-gpus {declared!r} != the pod's {GPU} {gpus}"
            )
        if gpus != tp:
            problems.append(
                f"{where}: each GPU pod must hold one tensor-parallel group: {GPU} {gpus} != "
                f"tp {tp}"
            )
        low, high, count = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if low is None or high is None:
            problems.append(f"{where} must set minReplicas and maxReplicas explicitly")
        elif not 0 <= low <= (count if count is not None else low) <= high:
            problems.append(
                f"{where}: need 0 <= minReplicas {low} <= replicas {count} <= maxReplicas {high}"
            )
    gpu_groups = [
        g
        for g in spec.get("workerGroupSpecs", [])
        if gpu_count(ray_container(g).get("resources", {}).get("limits", {}).get(GPU))
    ]
    pods = sum(g.get("minReplicas", 0) for g in gpu_groups)
    autoscaled = app_args.get("max_replicas") is not None
    replicas = int(app_args.get("min_replicas", 1) if autoscaled else app_args.get("replicas", 1))
    if pods < replicas:
        problems.append(
            f"{replicas} replicas of tp {tp} need {replicas} GPU pods; minReplicas give {pods}"
        )
    if autoscaled:
        most = int(app_args["max_replicas"])
        room = sum(g.get("maxReplicas", 0) for g in gpu_groups)
        if room < most:
            problems.append(
                f"up to {most} replicas of tp {tp} need {most} GPU pods; maxReplicas give {room}"
            )
        if most > pods and spec.get("enableInTreeAutoscaling") is not True:
            problems.append(
                "Serve scales replicas beyond the minReplicas pods: enableInTreeAutoscaling must "
                "be true so that KubeRay adds GPU pods for them"
            )
    return problems


def _models_in(annotation: Any) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def strict_problems(annotation: Any, value: Any, where: str) -> list[str]:
    """What Serve's schemas let through, recursively: keys that no field of the pydantic model(s)
    in ``annotation`` names, and values of fields typed ``Union[Dict, SomeModel]``.

    Serve's schemas ignore unknown keys (forward compatibility), so a misspelt option would be
    dropped without a word; and pydantic takes a mapping given to ``Union[Dict,
    RequestRouterConfig]``
    as the plain ``Dict``, so e.g. a negative stats period would only fail at deploy time."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List) and isinstance(value, list):  # noqa: UP006
        [item] = typing.get_args(annotation) or [Any]
        return [p for i, v in enumerate(value) for p in strict_problems(item, v, f"{where}[{i}]")]
    if origin in (dict, typing.Dict) and isinstance(value, dict) and typing.get_args(annotation):  # noqa: UP006
        item = typing.get_args(annotation)[1]
        return [p for k, v in value.items() for p in strict_problems(item, v, f"{where}.{k}")]
    models = _models_in(annotation)
    if not models or not isinstance(value, dict):
        return []
    found: list[str] = []
    for model in models:
        names = {
            alias for name, f in model.model_fields.items() for alias in (name, f.alias) if alias
        }
        found = [f"unknown key {where}.{key}" for key in value if key not in names]
        for key, sub in value.items():
            if key in model.model_fields:
                found += strict_problems(model.model_fields[key].annotation, sub, f"{where}.{key}")
        if not found and len(models) == 1 and origin in (typing.Union, types.UnionType):
            try:
                model.model_validate(value)
            except pydantic.ValidationError as error:
                found.append(f"{where}: {error}")
        if not found:
            return []
    return found


def serve_config_problems(config: dict[str, Any]) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as error:
        return [str(error)]
    return strict_problems(ServeDeploySchema, config, "config")


def relabel_keeps(relabelings: list[dict[str, Any]], meta: dict[str, str]) -> bool:
    """Whether Prometheus keeps a target with these ``__meta_*`` labels (keep/drop actions)."""
    for rule in relabelings:
        action = rule.get("action", "replace").lower()
        if action not in ("keep", "drop"):
            continue
        joined = rule.get("separator", ";").join(
            meta.get(s, "") for s in rule.get("sourceLabels", [])
        )
        matched = re.fullmatch(rule.get("regex", "(.*)"), joined) is not None
        if matched != (action == "keep"):
            return False
    return True


def pod_templates(rayservice: dict[str, Any]) -> dict[str, tuple[dict[str, str], dict[str, int]]]:
    """``{group: (labels as KubeRay sets them on the pods, named ports of the Ray container)}``.

    KubeRay adds ray.io/is-ray-node, ray.io/node-type, ray.io/group and ray.io/cluster (the
    generated RayCluster name) to the template's labels."""
    spec = cluster_spec(rayservice)
    cluster = f"{rayservice['metadata']['name']}-abcde"
    groups = [("headgroup", "head", spec["headGroupSpec"])]
    groups += [(g["groupName"], "worker", g) for g in spec.get("workerGroupSpecs", [])]
    pods = {}
    for name, node_type, group in groups:
        labels = dict(group["template"].get("metadata", {}).get("labels", {}))
        labels.update(
            {
                "ray.io/is-ray-node": "yes",
                "ray.io/node-type": node_type,
                "ray.io/group": name,
                "ray.io/cluster": cluster,
            }
        )
        pods[name] = (labels, ports_by_name(ray_container(group)))
    return pods


def podmonitor_problems(podmonitor: dict[str, Any], rayservice: dict[str, Any]) -> list[str]:
    problems = []
    selector = podmonitor["spec"]["selector"]
    if set(selector) - {"matchLabels"}:
        problems.append("only selector.matchLabels is checked here")
    want = selector.get("matchLabels", {})
    pods = pod_templates(rayservice)
    selected = {g: p for g, p in pods.items() if all(p[0].get(k) == v for k, v in want.items())}
    if set(selected) != set(pods):
        problems.append(
            f"the selector {want} misses pod groups {sorted(set(pods) - set(selected))}"
        )
    for endpoint in podmonitor["spec"]["podMetricsEndpoints"]:
        port = endpoint.get("port")
        kept = []
        for group, (labels, ports) in selected.items():
            meta = {
                "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                for k, v in labels.items()
            }
            if relabel_keeps(endpoint.get("relabelings", []), meta):
                kept.append(group)
                if port not in ports:
                    problems.append(
                        f"endpoint port {port!r} is not a named port of the {group} pods "
                        f"(they have {sorted(ports)})"
                    )
        if not kept:
            problems.append(f"endpoint port {port!r} keeps no pod")
    return problems


def app_deployments(args: dict[str, Any]) -> dict[str, Any]:
    """The deployments Serve builds from ``cluster.app:build_app`` with these args."""
    from ray.serve import Application
    from ray.serve._private.build_app import build_app as serve_build

    module = importlib.import_module("cluster.app")
    app = module.build_app(dict(args))
    assert isinstance(app, Application)
    return {d.name: d for d in serve_build(app, name="vattn").deployments}


# ---- the RayService ------------------------------------------------------------------------------
def test_crd_schemas_record_their_source() -> None:
    readme = (DATA / "README.md").read_text()
    for name, source in (
        ("rayservice-crd-schema.json", "ray-project/kuberay"),
        ("podmonitor-crd-schema.json", "prometheus-operator/prometheus-operator"),
    ):
        comment = json.loads((DATA / name).read_text())["$comment"]
        assert source in comment and " tag v" in comment, comment
        assert name in readme and source in readme


def test_rayservice_matches_kuberay_crd(rayservice: dict[str, Any]) -> None:
    assert schema_errors("rayservice-crd-schema.json", rayservice) == []


def test_rayservice_passes_kuberay_and_gpu_layout_checks(rayservice: dict[str, Any]) -> None:
    assert manifest_problems(rayservice) == []
    spec = cluster_spec(rayservice)
    args = the_app(serve_config_of(rayservice))["args"]
    [workers] = spec["workerGroupSpecs"]
    # Autoscaled: the GPU pods follow the replicas between the same bounds.
    assert spec["enableInTreeAutoscaling"] is True
    assert workers["minReplicas"] == workers["replicas"] == args["min_replicas"]
    assert workers["maxReplicas"] == args["max_replicas"] > workers["minReplicas"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert workers["rayStartParams"]["num-gpus"] == str(args["tp"])


def test_rayservice_images_and_versions(rayservice: dict[str, Any]) -> None:
    import ray

    spec = cluster_spec(rayservice)
    # The Serve config is checked against this Ray's schema; the image must run the same Ray.
    assert spec["rayVersion"] == ray.__version__
    dockerfile = (K8S / "Dockerfile").read_text()
    [base] = re.findall(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert base.startswith(f"rayproject/ray:{spec['rayVersion']}-py311"), base
    for path in re.findall(
        r"^COPY --chown=\S+ (.+) /tmp/vattn-src/?\S*$", dockerfile, flags=re.MULTILINE
    ):
        for source in path.split():
            assert (ROOT / source).exists(), f"k8s/Dockerfile copies {source}, which does not exist"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == IMAGE
            assert set(container["resources"]) == {"limits", "requests"}
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert f"docker build -f k8s/Dockerfile -t {IMAGE} ." in (K8S / "README.md").read_text()


def test_rayservice_ports(rayservice: dict[str, Any]) -> None:
    spec = cluster_spec(rayservice)
    config = serve_config_of(rayservice)
    head = ports_by_name(ray_container(spec["headGroupSpec"]))
    # KubeRay builds the <name>-serve-svc from the head container's port named "serve".
    assert head["serve"] == config["http_options"]["port"] == 8000
    assert config["http_options"]["host"] == "0.0.0.0"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        ports = ports_by_name(ray_container(group))
        assert ports["metrics"] == 8080
        assert group["rayStartParams"]["metrics-export-port"] == str(ports["metrics"])
        assert ports["serve"] == 8000  # Serve runs an HTTP proxy on every node (EveryNode)
    assert config["proxy_location"] == "EveryNode"


# ---- the Serve configs ---------------------------------------------------------------------------
@pytest.mark.parametrize("source", sorted(serve_configs()))
def test_serve_config_matches_ray_schema(source: str) -> None:
    config = serve_configs()[source]
    assert serve_config_problems(config) == []
    app = the_app(config)
    assert app["route_prefix"] == "/"
    assert app["import_path"] == "cluster.app:build_app"


def test_rayservice_deploys_the_example_serve_config_on_gpus(rayservice: dict[str, Any]) -> None:
    local = load_one(SERVE_CONFIG)
    cluster = serve_config_of(rayservice)
    local_args, cluster_args = the_app(local)["args"], the_app(cluster)["args"]
    assert cluster_args["device"] == "cuda" and isinstance(cluster_args["tp"], int)
    assert set(local_args) == set(cluster_args)
    differ = {k for k in local_args if local_args[k] != cluster_args[k]}
    assert differ <= CLUSTER_ARGS, (
        f"only {sorted(CLUSTER_ARGS)} may differ, also: {sorted(differ - CLUSTER_ARGS)}"
    )

    def without_args(config: dict[str, Any]) -> dict[str, Any]:
        config = copy.deepcopy(config)
        for app in config["applications"]:
            app.pop("args")
        return config

    assert without_args(local) == without_args(cluster)


@pytest.mark.parametrize("source", sorted(serve_configs()))
def test_serve_config_builds_the_app(source: str) -> None:
    app = the_app(serve_configs()[source])
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    deployments = app_deployments(app["args"])
    assert set(deployments) == {"VattnIngress", "VattnReplica"}
    for options in app.get("deployments", []):
        # Serve refuses to deploy a config that overrides a deployment the app does not have.
        assert options["name"] in deployments
    replica = deployments["VattnReplica"]
    scaling = replica._deployment_config.autoscaling_config
    assert scaling is not None, "the example configs autoscale"
    assert (scaling.min_replicas, scaling.max_replicas) == (
        app["args"]["min_replicas"],
        app["args"]["max_replicas"],
    )
    assert scaling.policy.policy_function == "cluster.autoscaler:KVPressurePolicy"
    assert scaling.upscale_delay_s < scaling.downscale_delay_s  # up fast, down slowly
    # A replica scaled down finishes its requests first: minutes, not Serve's default 20 s.
    assert replica._deployment_config.graceful_shutdown_timeout_s >= 300


def test_rayservice_pods_fit_the_app(rayservice: dict[str, Any]) -> None:
    """What the built app asks Ray for (device cuda) fits the worker pods."""
    args = the_app(serve_config_of(rayservice))["args"]
    replica = app_deployments(args)["VattnReplica"]
    actor = replica.ray_actor_options
    bundles = replica._replica_config.placement_group_bundles
    per_replica_gpus = (
        sum(b.get("GPU", 0) for b in bundles) if bundles else actor.get("num_gpus", 0)
    )
    per_replica_cpus = (
        sum(b.get("CPU", 0) for b in bundles) if bundles else actor.get("num_cpus", 1)
    )
    assert per_replica_gpus >= 1, "device cuda must ask for GPUs"
    [workers] = cluster_spec(rayservice)["workerGroupSpecs"]
    limits = ray_container(workers)["resources"]["limits"]
    assert per_replica_gpus <= int(limits[GPU]) == int(args["tp"])
    assert per_replica_cpus <= float(limits["cpu"])
    assert workers["minReplicas"] * int(limits[GPU]) >= args["min_replicas"] * per_replica_gpus
    assert workers["maxReplicas"] * int(limits[GPU]) >= args["max_replicas"] * per_replica_gpus


@pytest.mark.parametrize("source", sorted(serve_configs()))
def test_router_override_is_the_free_page_router(source: str) -> None:
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import RequestRouter

    from cluster.router import ROUTER_PATH, router_config

    app = the_app(serve_configs()[source])
    given = override(app, "VattnReplica")["request_router_config"]
    module, _, attr = given["request_router_class"].partition(":")
    router = getattr(importlib.import_module(module), attr)
    assert inspect.isclass(router) and issubclass(router, RequestRouter)
    inspect.signature(router.initialize_state).bind(None, **given.get("request_router_kwargs", {}))
    # Serve replaces the code's whole request_router_config with this block: it must say what
    # cluster.app would (anything left out would fall back to Serve's defaults).
    expected = router_config(float(app["args"]["routing_stats_period_s"]))
    assert expected.request_router_class == ROUTER_PATH
    assert RequestRouterConfig(**given).model_dump() == expected.model_dump()


# ---- monitoring ----------------------------------------------------------------------------------
def test_podmonitor_matches_prometheus_operator_crd(podmonitor: dict[str, Any]) -> None:
    assert schema_errors("podmonitor-crd-schema.json", podmonitor) == []


def test_podmonitor_scrapes_ray_and_vattn(
    podmonitor: dict[str, Any], rayservice: dict[str, Any]
) -> None:
    assert podmonitor_problems(podmonitor, rayservice) == []
    endpoints = {e["port"]: e for e in podmonitor["spec"]["podMetricsEndpoints"]}
    assert set(endpoints) == {"metrics", "serve"}
    assert endpoints["serve"]["path"] == endpoints["metrics"]["path"] == "/metrics"
    pods = pod_templates(rayservice)
    meta = {
        g: {"__meta_kubernetes_pod_label_ray_io_node_type": labels["ray.io/node-type"]}
        for g, (labels, _) in pods.items()
    }
    # Ray's metrics from every pod; vattn's aggregated /metrics from the head only.
    assert all(relabel_keeps(endpoints["metrics"].get("relabelings", []), m) for m in meta.values())
    assert [g for g, m in meta.items() if relabel_keeps(endpoints["serve"]["relabelings"], m)] == [
        "headgroup"
    ]


def _configmap_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_dashboard_configmap", K8S / "make_dashboard_configmap.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_configmap_is_generated_from_the_dashboards() -> None:
    maker = _configmap_module()
    files = maker.dashboard_files()
    if not files:
        pytest.skip("dashboards/ holds no *.json yet: nothing to put in the ConfigMap")
    assert CONFIGMAP.exists(), "run python k8s/make_dashboard_configmap.py"
    configmap = load_one(CONFIGMAP)
    assert configmap["apiVersion"] == "v1" and configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    data = configmap["data"]
    assert set(data) == {f.name for f in files}, "run python k8s/make_dashboard_configmap.py"
    for path in files:
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", path.name)
        assert json.loads(data[path.name]) == json.loads(path.read_text()), (
            f"{path.name} differs from dashboards/: run python k8s/make_dashboard_configmap.py"
        )
    assert CONFIGMAP.read_text() == maker.render(maker.load_dashboards(files)), (
        "run python k8s/make_dashboard_configmap.py"
    )
    assert sum(len(k.encode()) + len(v.encode()) for k, v in data.items()) <= maker.MAX_BYTES


def test_dashboard_configmap_maker_refuses_bad_input(tmp_path: Path) -> None:
    maker = _configmap_module()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        maker.load_dashboards(maker.dashboard_files(tmp_path))
    (tmp_path / "broken.json").write_text("[1, 2]")
    with pytest.raises(TypeError, match="not a Grafana dashboard"):
        maker.load_dashboards(maker.dashboard_files(tmp_path))
    with pytest.raises(ValueError, match="no dashboards"):
        maker.render({})
    (tmp_path / "broken.json").write_text(json.dumps({"title": "t", "panels": [{"id": 1}]}))
    text = maker.render(maker.load_dashboards(maker.dashboard_files(tmp_path)))
    assert json.loads(yaml.safe_load(text)["data"]["broken.json"]) == {
        "title": "t",
        "panels": [{"id": 1}],
    }


# ---- the checks catch broken manifests -----------------------------------------------------------
def _workers(manifest: dict[str, Any]) -> dict[str, Any]:
    return cluster_spec(manifest)["workerGroupSpecs"][0]


def test_gpu_limit_without_request_is_refused(rayservice: dict[str, Any]) -> None:
    broken = copy.deepcopy(rayservice)
    del ray_container(_workers(broken))["resources"]["requests"][GPU]
    # Kubernetes itself would default the request to the limit, so the CRD schema accepts it.
    assert schema_errors("rayservice-crd-schema.json", broken) == []
    assert any("limit 1 and request None" in p for p in manifest_problems(broken))


def test_gpu_request_unequal_to_limit_is_refused(rayservice: dict[str, Any]) -> None:
    broken = copy.deepcopy(rayservice)
    ray_container(_workers(broken))["resources"]["requests"][GPU] = "2"
    assert any("must both be set, and equal" in p for p in manifest_problems(broken))


def test_unquoted_ray_start_param_is_refused(rayservice: dict[str, Any]) -> None:
    broken = copy.deepcopy(rayservice)
    _workers(broken)["rayStartParams"]["num-gpus"] = 1
    assert any(
        "rayStartParams.num-gpus" in e and "is not of type 'string'" in e
        for e in schema_errors("rayservice-crd-schema.json", broken)
    )
    assert any("must be a quoted string" in p for p in manifest_problems(broken))
    # As YAML text: an unquoted number parses as an int.
    text = RAYSERVICE.read_text().replace('num-gpus: "1"', "num-gpus: 1", 1)
    assert schema_errors("rayservice-crd-schema.json", yaml.safe_load(text))


def test_gpu_count_mismatches_are_refused(rayservice: dict[str, Any]) -> None:
    wrong_tp = copy.deepcopy(rayservice)
    config = serve_config_of(wrong_tp)
    the_app(config)["args"]["tp"] = 2
    wrong_tp["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert any("!= tp 2" in p for p in manifest_problems(wrong_tp))

    wrong_param = copy.deepcopy(rayservice)
    _workers(wrong_param)["rayStartParams"]["num-gpus"] = "2"
    assert any("num-gpus '2' != the pod's" in p for p in manifest_problems(wrong_param))

    gpu_head = copy.deepcopy(rayservice)
    cluster_spec(gpu_head)["headGroupSpec"]["rayStartParams"]["num-gpus"] = "1"
    assert any("the head must hold no GPUs" in p for p in manifest_problems(gpu_head))

    too_few_pods = copy.deepcopy(rayservice)
    _workers(too_few_pods)["minReplicas"] = _workers(too_few_pods)["replicas"] = 0
    assert any("need 1 GPU pods; minReplicas give 0" in p for p in manifest_problems(too_few_pods))

    too_few_at_most = copy.deepcopy(rayservice)
    _workers(too_few_at_most)["maxReplicas"] = 2
    assert any(
        "need 4 GPU pods; maxReplicas give 2" in p for p in manifest_problems(too_few_at_most)
    )

    no_autoscaler = copy.deepcopy(rayservice)
    cluster_spec(no_autoscaler)["enableInTreeAutoscaling"] = False
    assert any(
        "enableInTreeAutoscaling must be true" in p for p in manifest_problems(no_autoscaler)
    )

    fixed = copy.deepcopy(rayservice)  # a fixed count needs that many pods at the minimum
    config = serve_config_of(fixed)
    args = the_app(config)["args"]
    del args["min_replicas"], args["max_replicas"]
    args["replicas"] = 2
    fixed["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert any("2 replicas of tp 1 need 2 GPU pods" in p for p in manifest_problems(fixed))

    no_bounds = copy.deepcopy(rayservice)
    del _workers(no_bounds)["maxReplicas"]
    assert any("minReplicas and maxReplicas explicitly" in p for p in manifest_problems(no_bounds))


def test_crd_schema_refuses_unknown_fields_and_wrong_types(rayservice: dict[str, Any]) -> None:
    misspelt = copy.deepcopy(rayservice)
    ray_container(_workers(misspelt))["resource"] = ray_container(_workers(misspelt)).pop(
        "resources"
    )
    assert any(
        "'resource' was unexpected" in e
        for e in schema_errors("rayservice-crd-schema.json", misspelt)
    )

    wrong_type = copy.deepcopy(rayservice)
    _workers(wrong_type)["replicas"] = "2"
    assert schema_errors("rayservice-crd-schema.json", wrong_type)

    wrong_kind = copy.deepcopy(rayservice)
    wrong_kind["apiVersion"] = "ray.io/v1alpha1"
    assert schema_errors("rayservice-crd-schema.json", wrong_kind)

    quantity = copy.deepcopy(rayservice)  # int-or-string: a bare number is a valid quantity
    ray_container(_workers(quantity))["resources"]["limits"]["cpu"] = 8
    assert schema_errors("rayservice-crd-schema.json", quantity) == []


def test_serve_config_typos_are_refused() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = load_one(SERVE_CONFIG)
    router = override(the_app(config), "VattnReplica")["request_router_config"]
    router["request_router_clas"] = router.pop("request_router_class")
    ServeDeploySchema.model_validate(config)  # Serve itself would ignore the misspelt key
    assert serve_config_problems(config) == [
        "unknown key "
        "config.applications[0].deployments[0].request_router_config.request_router_clas"
    ]

    config = load_one(SERVE_CONFIG)
    override(the_app(config), "VattnReplica")["request_router_config"][
        "request_routing_stats_period_s"
    ] = -1
    ServeDeploySchema.model_validate(config)  # taken as a plain Dict
    [problem] = serve_config_problems(config)
    assert "request_routing_stats_period_s" in problem and "greater than 0" in problem

    config = load_one(SERVE_CONFIG)
    the_app(config)["args"]["tensor_parallel"] = 2
    with pytest.raises(ValueError, match="tensor_parallel\n  Extra inputs are not permitted"):
        app_deployments(the_app(config)["args"])


def test_podmonitor_problems_are_found(
    podmonitor: dict[str, Any], rayservice: dict[str, Any]
) -> None:
    wrong_port = copy.deepcopy(podmonitor)
    wrong_port["spec"]["podMetricsEndpoints"][1]["port"] = "http"
    assert any(
        "'http' is not a named port" in p for p in podmonitor_problems(wrong_port, rayservice)
    )

    wrong_selector = copy.deepcopy(podmonitor)
    wrong_selector["spec"]["selector"]["matchLabels"]["ray.io/node-type"] = "head"
    assert any(
        "misses pod groups ['gpu']" in p for p in podmonitor_problems(wrong_selector, rayservice)
    )

    no_serve_port = copy.deepcopy(rayservice)
    head = ray_container(cluster_spec(no_serve_port)["headGroupSpec"])
    head["ports"] = [p for p in head["ports"] if p["name"] != "serve"]
    assert any(
        "'serve' is not a named port of the headgroup" in p
        for p in podmonitor_problems(podmonitor, no_serve_port)
    )

    misspelt = copy.deepcopy(podmonitor)
    misspelt["spec"]["podMetricsEndpoints"][0]["intervl"] = "15s"
    assert schema_errors("podmonitor-crd-schema.json", misspelt)
