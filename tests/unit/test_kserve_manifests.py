"""deploy/kserve, checked offline: every manifest against its resource schema, and against the code.

No cluster runs here. Kubernetes kinds are validated against the strict JSON schemas that
kubernetes-validate bundles (unknown fields are errors); the InferenceService against KServe's own
API types from the `kserve` package (kserve.models, with kubernetes.client.models for the pod
parts): every field must exist there with the right type, required fields must be present. Then
the parts must agree with each other and with the code: commands parse with our CLI, environment
variables are settings fields, probes hit routes the servers have, labels and names match.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from advexplain.cli import build_parser
from advexplain.shared.oip import OipEndpoint, is_oip_url

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
oip_server = pytest.importorskip("advexplain.services.blackbox.oip", reason="the kserve extra is not installed")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kserve"
KUBERNETES = "1.32"  # the schemas' Kubernetes version: KServe 0.21 supports recent releases
DOCS = [
    (path.name, doc) for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
]
NAMESPACE = "advexplain"


def kind(name: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == name]


def one(kind_name: str) -> dict:
    found = kind(kind_name)
    assert len(found) == 1, f"expected one {kind_name}, found {len(found)}"
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# -- schemas -----------------------------------------------------------------------------------

def test_there_is_something_to_check():
    assert {doc["kind"] for _, doc in DOCS} == {"Namespace", "PersistentVolumeClaim", "Job", "InferenceService",
                                               "Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"}


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in DOCS if d["kind"] != "InferenceService"],
                         ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kubernetes_manifests_match_the_strict_schemas(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE or doc["kind"] == "Namespace"


with oip_server.argv_hidden():
    import kserve.models as kserve_models
import kubernetes.client.models as k8s_models  # noqa: E402 - after kserve, which brings it

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str,
              "date": str}
# Types kserve's generated models name but do not define (its generator prefixes them differently).
ALIASES = {"K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy",
           "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
           "V1Time": "str", "ResourceQuantity": "quantity"}


def check_typed(value, type_name: str, where: str) -> None:
    """Raise AssertionError when `value` is not a `type_name` of kserve's / kubernetes' OpenAPI models."""
    type_name = ALIASES.get(type_name, type_name)
    if type_name == "quantity":
        assert isinstance(value, (str, int)) and not isinstance(value, bool), f"{where}: not a quantity"
        return
    if type_name in PRIMITIVES:
        expected = PRIMITIVES[type_name]
        assert isinstance(value, expected) and not (type_name in ("int", "float") and isinstance(value, bool)), \
            f"{where}: {value!r} is not {type_name}"
        return
    # kserve's models write list[X] and dict(str, X); the kubernetes client's List[X] and Dict[str, X].
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        assert isinstance(value, list), f"{where}: not a list"
        for i, item in enumerate(value):
            check_typed(item, match[1], f"{where}[{i}]")
        return
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        assert isinstance(value, dict), f"{where}: not a mapping"
        for key, item in value.items():
            check_typed(item, match[1] or match[2], f"{where}.{key}")
        return
    cls = getattr(kserve_models, type_name, None) or getattr(k8s_models, type_name, None)
    assert cls is not None, f"{where}: unknown API type {type_name} (add it to ALIASES)"
    assert isinstance(value, dict), f"{where}: a {type_name} must be a mapping"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = set(value) - set(by_json)
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of {type_name}"
    for key, item in value.items():
        check_typed(item, cls.openapi_types[by_json[key]], f"{where}.{key}")
    # The generated constructors enforce required fields and enums (client-side validation).
    try:
        cls(**{by_json[k]: v for k, v in value.items()})
    except ValueError as exc:
        raise AssertionError(f"{where}: {exc}") from exc


def test_inference_service_matches_kserves_api_types():
    isvc = one("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    check_typed(isvc, "V1beta1InferenceService", "InferenceService")


@pytest.mark.parametrize("broken, why", [
    ({"spec": {"predictor": {"containerz": []}}}, "containerz"),
    ({"spec": {"predictor": {"minReplicas": "one"}}}, "not int"),
    ({"spec": {"predictor": {"containers": [{"image": "x"}]}}}, "name"),
    ({"spec": {"predictor": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocl": "TCP"}]}]}}},
     "protocl"),
])
def test_the_inference_service_check_catches_mistakes(broken, why):
    doc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x"}, **broken}
    with pytest.raises(AssertionError, match=why):
        check_typed(doc, "V1beta1InferenceService", "InferenceService")


def test_the_kubernetes_check_catches_unknown_fields():
    deployment = one("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


# -- the parts agree with each other and with the code -----------------------------------------

def predictor_container() -> dict:
    (container,) = one("InferenceService")["spec"]["predictor"]["containers"]
    return container


def explainer_container() -> dict:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def settings_fields() -> dict[str, set[str]]:
    from advexplain.services.blackbox.settings import BlackboxSettings
    from advexplain.services.explainer.settings import ExplainerSettings

    return {"BLACKBOX_": {n.upper() for n in BlackboxSettings.model_fields},
            "EXPLAINER_": {n.upper() for n in ExplainerSettings.model_fields}}


@pytest.mark.parametrize("container", [predictor_container, explainer_container], ids=["predictor", "explainer"])
def test_every_environment_variable_is_a_setting(container):
    fields = settings_fields()
    for name in env_of(container()):
        if name == "ADVEXPLAIN_THREADS":
            continue
        prefix = next((p for p in fields if name.startswith(p)), None)
        assert prefix and name.removeprefix(prefix) in fields[prefix], f"{name} is not a settings field"


def test_predictor_runs_our_oip_server_where_kserve_expects_it():
    container = predictor_container()
    env = {k: v["value"] for k, v in env_of(container).items()}
    args = build_parser().parse_args(container["command"][1:])
    assert container["command"][0] == "advexplain" and (args.command, args.service, args.protocol) == \
        ("serve", "blackbox", "oip")
    from advexplain.services.blackbox.settings import BlackboxSettings

    settings = BlackboxSettings.model_construct(**{k.removeprefix("BLACKBOX_").lower(): v for k, v in env.items()
                                                   if k.startswith("BLACKBOX_")})
    assert settings.port == "8080" and env["BLACKBOX_HOST"] == "0.0.0.0"  # KServe's predictor port
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    name = env["BLACKBOX_NAME"]
    assert container["readinessProbe"]["httpGet"] == {"path": f"/v2/models/{name}/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert env["BLACKBOX_MODEL"].startswith("/models/")


def test_explainer_calls_the_predictors_cluster_local_oip_url():
    isvc = one("InferenceService")
    url = env_of(explainer_container())["EXPLAINER_BLACKBOX_URL"]["value"]
    assert is_oip_url(url)
    endpoint = OipEndpoint.parse(url)
    name = env_of(predictor_container())["BLACKBOX_NAME"]["value"]
    assert endpoint.base == f"http://{isvc['metadata']['name']}-predictor.{NAMESPACE}.svc.cluster.local"
    assert endpoint.model == name
    # RawDeployment: a plain Service in front of the predictor, which the NetworkPolicy can fence.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_whitebox_token_comes_from_a_secret_and_the_route_stays_off_without_it():
    token = env_of(explainer_container())["EXPLAINER_WHITEBOX_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "advexplain-whitebox", "key": "token", "optional": True}
    assert "value" not in token
    for _, doc in DOCS:
        assert doc["kind"] != "Secret", "no token is committed: the README creates the Secret"
    assert "create secret generic advexplain-whitebox" in (ROOT / "README.md").read_text()


def test_every_container_requests_resources_runs_as_non_root_and_probes_readiness():
    pods = [one("InferenceService")["spec"]["predictor"], one("Deployment")["spec"]["template"]["spec"],
            one("Job")["spec"]["template"]["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        for container in pod["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
    for container in (predictor_container(), explainer_container()):
        assert "readinessProbe" in container


def test_explainer_probe_service_and_autoscaler_agree():
    deployment, service, hpa = one("Deployment"), one("Service"), one("HorizontalPodAutoscaler")
    container = explainer_container()
    port = int(env_of(container)["EXPLAINER_PORT"]["value"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert [p["containerPort"] for p in container["ports"]] == [port]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"] >= 1


def test_network_policy_lets_only_the_explainer_reach_the_predictor():
    policy = one("NetworkPolicy")["spec"]
    isvc_name = one("InferenceService")["metadata"]["name"]
    # KServe labels the predictor's pods with the InferenceService's name.
    assert policy["podSelector"] == {"matchLabels": {"serving.kserve.io/inferenceservice": isvc_name}}
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    explainer_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert set(source) == {"podSelector"} and source["podSelector"]["matchLabels"].items() <= explainer_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]


def test_models_volume_is_shared_and_read_only_for_the_servers():
    claim = one("PersistentVolumeClaim")["metadata"]["name"]
    predictor = one("InferenceService")["spec"]["predictor"]
    for pod, container, read_only in ((predictor, predictor_container(), True),
                                      (one("Deployment")["spec"]["template"]["spec"], explainer_container(), True),
                                      (one("Job")["spec"]["template"]["spec"], one("Job")["spec"]["template"]["spec"]
                                       ["containers"][0], False)):
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        (mount,) = container["volumeMounts"]
        assert mount["mountPath"] == "/models" and mount.get("readOnly", False) is read_only


def test_train_job_trains_what_the_servers_load():
    script = one("Job")["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    commands = re.findall(r"advexplain (train [^)&|]+)", script)
    outs = set()
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))
        outs.add(str(args.out))
    wanted = {env_of(predictor_container())["BLACKBOX_MODEL"]["value"],
              env_of(explainer_container())["EXPLAINER_SURROGATE"]["value"],
              env_of(explainer_container())["EXPLAINER_WHITEBOX_MODEL"]["value"]}
    assert wanted <= outs


def test_readme_deploys_what_is_here():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy on KServe", 1)[1].split("\n## ", 1)[0]
    assert "No cluster runs here" in section
    for name, _ in DOCS:
        assert name in section or "deploy/kserve/" in section
    assert "EXTRAS=kserve" in section
