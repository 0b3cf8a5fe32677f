"""Kubernetes artefacts checked without a cluster: the Helm chart linted and
rendered with the real Helm library (helm-python-sdk), every rendered or
generated object validated against the Kubernetes schemas
(kubernetes-validate), and the example instances against the generated CRD."""

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
import helm_python

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ringmq-operator"
KUBE = "1.33.0"


def docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def validate(doc):
    """kubernetes-validate, strict: unknown fields are errors too."""
    kubernetes_validate.validate(doc, KUBE, strict=True)


def render(values=None):
    chart = helm_python.Chart.load(CHART)
    out = chart.render(values=values or {}, name="ringmq", namespace="ringmq-system", is_install=True)
    objects = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        objects += docs(text)
    return objects


def test_the_chart_lints_clean():
    report = helm_python.lint(CHART, strict=True, kube_version="v1.33.0")
    assert not report.get("errors"), report
    bad = [m for m in report.get("messages", []) if m.get("severity") not in ("INFO", 1, "1")]
    assert not bad, report


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespace": "mqtt", "grafanaDashboard": {"enabled": True}, "replicas": 2},
        {"serviceAccount": {"create": False, "name": "ops"}},
    ],
)
def test_rendered_objects_are_valid_kubernetes(values):
    objects = render(values)
    kinds = sorted(o["kind"] for o in objects)
    assert "Deployment" in kinds
    for o in objects:
        validate(o)
    rbac = [
        o
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
        and not o["metadata"]["name"].endswith(("crd-reader", "leader-election"))
    ]
    assert len(rbac) == 1
    role = rbac[0]
    assert role["kind"] == ("Role" if values.get("watchNamespace") else "ClusterRole")
    # Least privilege: no wildcard, no delete, secrets never listed.
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        # Deleting: only pods (stuck on a broken revision, or drained for a
        # scale-down that was called off).
        assert "delete" not in rule["verbs"] or rule["resources"] == ["pods"], rule
        if "secrets" in rule["resources"]:
            assert set(rule["verbs"]) == {"get", "create", "patch"}, rule
    # The leader election Lease: its own Role, in the release namespace only.
    election = next(o for o in objects if o["metadata"]["name"].endswith("leader-election") and o["kind"] == "Role")
    assert election["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]
    dep = next(o for o in objects if o["kind"] == "Deployment")
    assert election["metadata"]["namespace"] == dep["metadata"]["namespace"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert env["LEASE_NAME"]
    assert env["WATCH_NAMESPACE"] == values.get("watchNamespace", "")
    assert env["RINGMQ_BROKER_IMAGE"].startswith("ghcr.io/ringmq/ringmq-broker:")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    if values.get("grafanaDashboard", {}).get("enabled"):
        cm = next(o for o in objects if o["kind"] == "ConfigMap")
        assert json.loads(cm["data"]["ringmq-dashboard.json"])["uid"] == "ringmq-instance"


def test_the_prometheus_rule_needs_the_prometheus_operator_api():
    # Offline, no cluster API is known: the rule is left out, as it is on a
    # cluster without the Prometheus Operator. Its template still lints.
    assert not any(o["kind"] == "PrometheusRule" for o in render({}))
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    assert '.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule"' in text
    for metric in ("ringmq_alarm_firing", "ringmq_capacity_exceeded_total"):
        assert metric in text
        assert f"`{metric}`" in (ROOT / "README.md").read_text(), "documented metric"


def test_values_outside_the_schema_are_refused():
    with pytest.raises(helm_python.HelmError):
        render({"watchNamespace": "Not_A_Namespace"})
    with pytest.raises(helm_python.HelmError):
        render({"image": {"repository": "x", "pullPolicy": "Sometimes"}})
    with pytest.raises(helm_python.HelmError):
        render({"unknownKey": 1})


def test_the_chart_carries_the_generated_crd_and_dashboard():
    assert (CHART / "crds" / "mqttinstances.ringmq.io.yaml").read_text() == (
        ROOT / "crds" / "mqttinstances.ringmq.io.yaml"
    ).read_text(), "copy crds/ into the chart (scripts/test checks this)"
    assert (CHART / "dashboards" / "ringmq-dashboard.json").read_text() == (
        ROOT / "manifests" / "grafana" / "ringmq-dashboard.json"
    ).read_text()


def crd():
    return docs((ROOT / "crds" / "mqttinstances.ringmq.io.yaml").read_text())[0]


def test_the_crd_is_a_valid_kubernetes_object():
    c = crd()
    validate(c)
    version = c["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = [p["name"] for p in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Replicas", "Connections", "Peak", "Age"]
    rules = json.dumps(version["schema"])
    assert "x-kubernetes-validations" in rules


def schema_validator():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("example", sorted((ROOT / "manifests" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_instances_match_the_crd(example):
    v = schema_validator()
    for doc in docs(example.read_text()):
        errors = sorted(v.iter_errors(doc), key=str)
        assert not errors, [e.message for e in errors]


def test_out_of_range_capacity_is_refused_by_the_schema():
    v = schema_validator()
    bad = {
        "apiVersion": "ringmq.io/v1alpha1",
        "kind": "MqttInstance",
        "metadata": {"name": "x"},
        "spec": {"capacity": {"connections": 50, "tps": 100, "subscriptions": 1000}, "groupIds": ["nope"]},
    }
    messages = [e.message for e in v.iter_errors(bad)]
    assert any("50" in m for m in messages), messages
    assert any("nope" in m for m in messages), messages


@pytest.mark.parametrize("golden", sorted((ROOT / "operator" / "tests" / "golden").glob("*.yaml")), ids=lambda p: p.name)
def test_operator_objects_are_valid_kubernetes(golden):
    objects = docs(golden.read_text())
    assert objects
    for o in objects:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            # Prometheus Operator kinds are not in the Kubernetes schemas.
            assert o["spec"], o
            continue
        validate(o)


@pytest.mark.parametrize("dockerfile", ["broker/Dockerfile", "operator/Dockerfile"])
def test_images_are_multi_stage_and_run_as_non_root(dockerfile):
    lines = [line.strip() for line in (ROOT / dockerfile).read_text().splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2, "a build stage and a runtime stage"
    final = lines[lines.index(stages[-1]):]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    assert not any(line.startswith("ADD http") for line in lines)
    # The binaries it builds exist in the workspace.
    for line in lines:
        for part in line.split("--bin ")[1:]:
            name = part.split()[0]
            assert any(
                f'name = "{name}"' in (ROOT / crate / "Cargo.toml").read_text() for crate in ("broker", "operator")
            ), name


def cel_rules(schema, path=()):
    """Every x-kubernetes-validations rule of a schema with where it applies:
    a path of property names, `[]` for every item of an array."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"], rule.get("message", "")
    for name, sub in schema.get("properties", {}).items():
        yield from cel_rules(sub, path + (name,))
    if "items" in schema:
        yield from cel_rules(schema["items"], path + ("[]",))


def at(doc, path):
    """The values a rule path reaches in a document."""
    if not path:
        return [doc]
    head, rest = path[0], path[1:]
    if head == "[]":
        return [v for item in (doc or []) for v in at(item, rest)]
    if isinstance(doc, dict) and head in doc:
        return at(doc[head], rest)
    return []


def failing_rules(doc):
    import celpy

    env = celpy.Environment()
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    failed = []
    for path, rule, message in cel_rules(schema):
        program = env.program(env.compile(rule))
        for value in at(doc, path):
            if not program.evaluate({"self": celpy.json_to_cel(value)}):
                failed.append(message)
    return failed


def test_the_crd_has_cross_field_rules():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    messages = [m for _, _, m in cel_rules(schema)]
    assert len(messages) >= 4, messages


@pytest.mark.parametrize("example", sorted((ROOT / "manifests" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_instances_pass_the_cel_rules(example):
    for doc in docs(example.read_text()):
        assert failing_rules(doc) == []


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"requireGroupIds": True}, "requireGroupIds needs at least one declared Group ID"),
        (
            {"users": [{"username": "a", "passwordSecret": {"name": "s", "key": "a"}}] * 2},
            "user names must be unique",
        ),
        (
            {"kafka": {"bootstrapServers": "k:9092", "parentTopics": [{"name": "t"}, {"name": "t"}]}},
            "parent topic names must be unique",
        ),
        (
            {"kafka": {"bootstrapServers": "k:9092", "securityProtocol": "SaslSsl", "parentTopics": []}},
            "SASL needs credentialsSecret and saslMechanism",
        ),
    ],
)
def test_cel_rules_refuse_inconsistent_specs(spec, message):
    doc = {
        "apiVersion": "ringmq.io/v1alpha1",
        "kind": "MqttInstance",
        "metadata": {"name": "x"},
        "spec": {"capacity": {"connections": 100, "tps": 100, "subscriptions": 1000}, **spec},
    }
    assert failing_rules(doc) == [message]


DNS_LABEL = "the name must be a DNS label (lower case letters, digits, '-') of at most 52 characters"


@pytest.mark.parametrize(
    "name, messages",
    [
        ("plant-7", []),
        ("x" * 52, []),
        ("x" * 53, [DNS_LABEL]),
        ("Plant_7", [DNS_LABEL]),
        ("7plant", [DNS_LABEL]),
        ("plant-", [DNS_LABEL]),
        ("plant-nodes", ["a name ending in -nodes would collide with another instance's headless Service"]),
    ],
)
def test_instance_names_leave_room_for_the_objects_named_after_them(name, messages):
    doc = {
        "apiVersion": "ringmq.io/v1alpha1",
        "kind": "MqttInstance",
        "metadata": {"name": name},
        "spec": {"capacity": {"connections": 100, "tps": 100, "subscriptions": 1000}},
    }
    assert failing_rules(doc) == messages
