"""deploy/kubernetes/: every manifest passes the Kubernetes API schemas (kubernetes-validate bundles them:
no cluster, no network), strictly (an unknown field is an error), and the pieces fit together: the
Service and the NetworkPolicy find the pods and their named ports, the image is the package's version,
and the mounted config is a valid config that watches itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from supervisor import __version__
from supervisor.config.schema import parse

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest and the newest API this package's schemas cover: Kubernetes 1.25 is where every field used
# here is stable (NetworkPolicy's port names, the pod securityContext's seccomp and sysctls).
VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def kind(name: str) -> dict[str, Any]:
    [found] = [doc for doc in documents() if doc["kind"] == name]
    return found


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_passes_the_api_schemas(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schemas_refuse_a_misspelt_field() -> None:
    """The check can fail: an unknown field in the container is refused."""
    deployment = kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_image_is_the_packages_version_pulled_only_when_missing() -> None:
    [container] = kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"reuseport-supervisor:{__version__}"
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_the_service_and_the_policy_find_the_pods_and_their_ports() -> None:
    """The Service publishes the HTTPS port only; the NetworkPolicy opens HTTPS to all and the metrics
    port to the monitoring namespace only; both select the Deployment's pods by their labels."""
    pod = kind("Deployment")["spec"]["template"]
    ports = {port["name"]: port["containerPort"] for port in pod["spec"]["containers"][0]["ports"]}
    service, policy = kind("Service"), kind("NetworkPolicy")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["https"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    rules = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["spec"]["ingress"]}
    assert set(rules) == set(ports) and rules["https"] is None
    assert rules["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_the_config_serves_on_the_named_ports_watches_itself_and_stops_in_time(tmp_path: Path) -> None:
    """Its listen and metrics ports are the container's; it watches the mounted config itself and the
    Secret's files (a ConfigMap edit reloads every pod); the probes ask the metrics port; the graceful
    stop plus the preStop pause fit in the termination grace period; no unsafe sysctl is asked for."""
    pod = kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    text = kind("ConfigMap")["data"]["supervisor.yaml"]
    assert yaml.safe_load(text)["watch"] == [f"{mounts['config']}/supervisor.yaml",
                                             f"{mounts['tls']}/tls.crt", f"{mounts['tls']}/tls.key"]
    for name in ("supervisor.yaml", "tls.crt", "tls.key"):  # the volumes' files, here in one folder
        (tmp_path / name).write_text("PEM")
    local = text.replace(f"{mounts['tls']}/", f"{tmp_path}/").replace(f"{mounts['config']}/", f"{tmp_path}/")
    cfg = parse(local, str(tmp_path / "supervisor.yaml"))
    assert cfg.metrics is not None and cfg.metrics.listen.port == ports["metrics"]
    [web] = cfg.programs
    assert [a.port for a in web.listen] == [ports["https"]]
    assert cfg.control.socket.startswith(mounts["run"] + "/")
    assert {container["livenessProbe"]["httpGet"]["port"], container["readinessProbe"]["httpGet"]["port"]} \
        == {"metrics"}
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert web.graceful_timeout + pause < pod["terminationGracePeriodSeconds"]
    assert "sysctls" not in pod["securityContext"] and cfg.migrate.value == "prefer"
