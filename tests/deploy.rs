//! The packaging files (Dockerfile, docker-compose.yml, deploy/): parsed and checked statically,
//! with the real tools where the machine has them (`promtool`, `systemd-analyze`, `docker
//! compose`). YAML is read through Python's PyYAML, the one YAML parser on the machine; a check
//! that can run neither its tool nor its parser fails rather than pass unchecked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Metrics being added in issue 6 (per-rule counters, lag in seconds, batch sizes, rules
/// reloads), which the dashboard and the alerts may name before `src/telemetry.rs` has them.
const METRICS_BEING_ADDED: &[&str] = &[
    "invalidator_rule_fired_total",
    "invalidator_rule_keys_total",
    "invalidator_rule_patterns_total",
    "invalidator_replication_lag_seconds",
    "invalidator_batch_keys",
    "invalidator_rules_reloads_total",
    "invalidator_rules_reload_errors_total",
];

/// The binary under test.
fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_invalidator")
}

/// A file of the repository.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Reads a file of the repository.
fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Whether `program` can be started (it exists on PATH and runs with these arguments).
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Every YAML document of `path` as JSON, through PyYAML's `safe_load_all` (merge keys and
/// anchors resolved). `Err` says why it could not be parsed, a missing parser included.
fn yaml_documents(path: &Path) -> Result<Vec<Value>, String> {
    const SCRIPT: &str = "import sys, json, yaml\n\
        with open(sys.argv[1]) as f:\n    \
            docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
        print(json.dumps(docs))\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run python3 to parse {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "python3 with PyYAML could not parse {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let docs: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(docs.as_array().cloned().unwrap_or_default())
}

/// Like [`yaml_documents`], failing the test with the reason.
fn yaml(path: &str) -> Vec<Value> {
    yaml_documents(&repo(path)).unwrap_or_else(|e| {
        panic!("{e}\n(the deploy tests need python3 with PyYAML: `pip install pyyaml`)")
    })
}

/// The metric names `src/telemetry.rs` defines (its `"invalidator_..."` string literals).
fn defined_metrics() -> BTreeSet<String> {
    let source = read("src/telemetry.rs");
    let mut names: BTreeSet<String> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("invalidator_") && s.bytes().all(is_name_byte))
        .map(str::to_owned)
        .collect();
    assert!(
        names.contains("invalidator_changes_total"),
        "src/telemetry.rs no longer defines its metric names as string literals: {names:?}"
    );
    names.extend(METRICS_BEING_ADDED.iter().map(|s| s.to_string()));
    names
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
}

/// The `invalidator_*` metric names a PromQL expression mentions (label values excluded: they are
/// quoted, and `job="invalidator"` has no underscore after the name).
fn metrics_in(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = expr[from..].find("invalidator_") {
        let start = from + at;
        let mut end = start;
        while end < bytes.len() && is_name_byte(bytes[end]) {
            end += 1;
        }
        let preceded = start > 0 && (is_name_byte(bytes[start - 1]) || bytes[start - 1] == b':');
        if !preceded {
            found.push(expr[start..end].to_owned());
        }
        from = end;
    }
    found
}

/// Whether `name` is a defined metric, or a histogram's `_bucket`, `_sum` or `_count` series.
fn is_defined(name: &str, defined: &BTreeSet<String>) -> bool {
    defined.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| defined.contains(base))
        })
}

/// Runs `promtool check rules` on `path` when promtool is on PATH; `false` when it is not.
fn promtool_check(path: &Path) -> bool {
    if !runs("promtool", &["--version"]) {
        return false;
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(path)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

#[test]
fn alert_rules_pass_promtool_and_each_says_what_to_do() {
    let path = repo("deploy/prometheus/alerts.yml");
    let checked_by_promtool = promtool_check(&path);
    if !checked_by_promtool {
        println!("deploy: promtool is not on PATH; checking alerts.yml with PyYAML only");
    }
    let docs = match yaml_documents(&path) {
        Ok(docs) => docs,
        Err(e) if checked_by_promtool => {
            println!("deploy: {e}; promtool checked the file, the structure check is skipped");
            return;
        }
        Err(e) => panic!("neither promtool nor PyYAML could check alerts.yml: {e}"),
    };
    assert_eq!(docs.len(), 1, "alerts.yml is one YAML document");
    let groups = docs[0]["groups"].as_array().expect("groups: a list");
    assert!(!groups.is_empty(), "alerts.yml has no group");

    let defined = defined_metrics();
    let mut exprs = String::new();
    let mut names = BTreeSet::new();
    for group in groups {
        assert!(str_at(group, "/name").is_some(), "a group without name");
        for rule in group["rules"].as_array().expect("rules: a list") {
            let alert = str_at(rule, "/alert").unwrap_or_else(|| panic!("no alert: {rule}"));
            assert!(
                names.insert(alert.to_owned()),
                "alert {alert} is defined twice"
            );
            let expr = str_at(rule, "/expr").unwrap_or_else(|| panic!("{alert}: no expr"));
            assert!(
                str_at(rule, "/for").is_some(),
                "{alert}: no `for` (write `for: 0m` for an alert that fires at once)"
            );
            let severity = str_at(rule, "/labels/severity").unwrap_or("");
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{alert}: labels.severity is {severity:?}"
            );
            let summary = str_at(rule, "/annotations/summary").unwrap_or("");
            let description = str_at(rule, "/annotations/description").unwrap_or("");
            assert!(!summary.is_empty(), "{alert}: no annotations.summary");
            assert!(
                description.len() > 80,
                "{alert}: annotations.description should say what to do"
            );
            for metric in metrics_in(expr) {
                assert!(
                    is_defined(&metric, &defined),
                    "{alert}: {metric} is not a metric invalidator exports"
                );
            }
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }

    // What issue 6 asks the alerts to cover.
    for needed in [
        "up{",
        "invalidator_errors_total",
        "invalidator_replication_lag_bytes",
        "invalidator_commit_to_delete_seconds_bucket",
        "pg_replication_slots_pg_wal_lsn_diff",
        "invalidator_outbox_rows",
        "invalidator_outbox_oldest_seconds",
        "invalidator_slot_resets_total",
        "invalidator_transaction_fallbacks_total",
        "invalidator_rules_reload_errors_total",
    ] {
        assert!(exprs.contains(needed), "no alert uses {needed}");
    }
}

#[test]
fn dashboard_panels_query_metrics_that_invalidator_exports() {
    let text = read("deploy/grafana/invalidator.json");
    let dash: Value = serde_json::from_str(&text).expect("invalidator.json is valid JSON");
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(str_at(&dash, "/uid").is_some_and(|u| !u.is_empty()));

    let variables = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        variables
            .iter()
            .any(|v| str_at(v, "/type") == Some("datasource")
                && str_at(v, "/query") == Some("prometheus")
                && str_at(v, "/name") == Some("datasource")),
        "no Prometheus data source variable named `datasource`"
    );

    let defined = defined_metrics();
    let mut used = BTreeSet::new();
    let mut exprs = Vec::new();
    let panels = dash["panels"].as_array().expect("panels");
    for panel in panels.iter().filter(|p| str_at(p, "/type") != Some("row")) {
        let title = str_at(panel, "/title").unwrap_or("(untitled)");
        assert_eq!(
            str_at(panel, "/datasource/uid"),
            Some("${datasource}"),
            "{title}: the panel does not use the data source variable"
        );
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty());
        for target in targets.unwrap_or_else(|| panic!("{title}: no targets")) {
            let expr = str_at(target, "/expr").unwrap_or_else(|| panic!("{title}: no expr"));
            let metrics = metrics_in(expr);
            assert!(
                !metrics.is_empty(),
                "{title}: {expr} names no invalidator_ metric"
            );
            for metric in metrics {
                assert!(
                    is_defined(&metric, &defined),
                    "{title}: {metric} is not a metric invalidator exports"
                );
                used.insert(metric);
            }
            exprs.push(expr.to_owned());
        }
    }

    // What issue 6 asks the dashboard to show.
    for needed in [
        "invalidator_changes_total",
        "invalidator_keys_deleted_total",
        "invalidator_patterns_total",
        "invalidator_scan_calls_total",
        "invalidator_commit_to_delete_seconds_bucket",
        "invalidator_replication_lag_bytes",
        "invalidator_errors_total",
        "invalidator_transactions_total",
        "invalidator_transaction_fallbacks_total",
        "invalidator_outbox_rows",
        "invalidator_outbox_oldest_seconds",
        "invalidator_rule_fired_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }

    // The queries are valid PromQL: promtool checks them as recording rules, with Grafana's
    // variables replaced by values.
    let dir = tempfile::tempdir().unwrap();
    let rules: String = exprs
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$job", ".*")
                .replace("$instance", ".*");
            format!(
                "      - record: dashboard:query_{i}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            )
        })
        .collect();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(
        &file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    if !promtool_check(&file) {
        println!("deploy: promtool is not on PATH; dashboard queries not checked as PromQL");
    }
}

/// The Deployments of `deploy/kubernetes/`, by file name.
fn deployments() -> Vec<(String, Value)> {
    let mut found = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let docs = yaml_documents(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(!docs.is_empty(), "{name} holds no document");
        for doc in docs {
            assert!(
                str_at(&doc, "/apiVersion").is_some(),
                "{name}: a document without apiVersion"
            );
            assert!(
                str_at(&doc, "/metadata/name").is_some(),
                "{name}: a document without a name"
            );
            if str_at(&doc, "/kind") == Some("Deployment") {
                found.push((name.clone(), doc));
            }
        }
    }
    found
}

/// The container that runs invalidator in a Deployment.
fn invalidator_container(deployment: &Value) -> &Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| str_at(c, "/name") == Some("invalidator"))
        })
        .expect("a container named invalidator")
}

/// Every document of a Kubernetes file, by kind and name.
fn kubernetes_object(file: &str, kind: &str, name: &str) -> Value {
    yaml(file)
        .into_iter()
        .find(|d| str_at(d, "/kind") == Some(kind) && str_at(d, "/metadata/name") == Some(name))
        .unwrap_or_else(|| panic!("{file} has no {kind} {name}"))
}

#[test]
fn kubernetes_manifests_probe_healthz_and_readyz_on_the_metrics_port() {
    let deployments = deployments();
    let files: BTreeSet<_> = deployments.iter().map(|(f, _)| f.as_str()).collect();
    assert!(
        files.contains("sidecar.yaml") && files.contains("standalone.yaml"),
        "expected the sidecar and standalone Deployments, found {files:?}"
    );
    let secret = kubernetes_object("deploy/kubernetes/secret.yaml", "Secret", "invalidator");

    for (file, deployment) in &deployments {
        let pod = &deployment["spec"]["template"];
        let spec = &pod["spec"];
        let container = invalidator_container(deployment);
        let at = |what: &str| format!("{file}: {what}");

        let ports = container["ports"].as_array().expect("ports");
        assert!(
            ports.iter().any(|p| str_at(p, "/name") == Some("metrics")
                && p["containerPort"].as_u64() == Some(9187)),
            "{}",
            at("no containerPort 9187 named metrics")
        );
        assert_eq!(
            str_at(container, "/livenessProbe/httpGet/path"),
            Some("/healthz"),
            "{}",
            at("liveness")
        );
        assert_eq!(
            str_at(container, "/livenessProbe/httpGet/port"),
            Some("metrics"),
            "{}",
            at("liveness port")
        );
        if let Some(readiness) = container.get("readinessProbe") {
            assert_eq!(
                str_at(readiness, "/httpGet/path"),
                Some("/readyz"),
                "{}",
                at("readiness")
            );
            assert_eq!(
                str_at(readiness, "/httpGet/port"),
                Some("metrics"),
                "{}",
                at("readiness port")
            );
        }

        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(
            str_at(annotations, "/prometheus.io~1scrape"),
            Some("true"),
            "{}",
            at("scrape annotation")
        );
        assert_eq!(
            str_at(annotations, "/prometheus.io~1port"),
            Some("9187"),
            "{}",
            at("port annotation")
        );

        // Service links would inject INVALIDATOR_SERVICE_HOST and the like, which invalidator
        // rejects as unknown settings.
        assert_eq!(
            spec["enableServiceLinks"],
            Value::Bool(false),
            "{}",
            at("enableServiceLinks")
        );

        let security = &container["securityContext"];
        let non_root = security["runAsNonRoot"] == Value::Bool(true)
            || spec["securityContext"]["runAsNonRoot"] == Value::Bool(true);
        assert!(non_root, "{}", at("runAsNonRoot"));
        assert_eq!(
            security["readOnlyRootFilesystem"],
            Value::Bool(true),
            "{}",
            at("read-only root")
        );
        assert_eq!(
            security["allowPrivilegeEscalation"],
            Value::Bool(false),
            "{}",
            at("escalation")
        );
        for key in [
            "/resources/requests/memory",
            "/resources/requests/cpu",
            "/resources/limits/memory",
        ] {
            assert!(str_at(container, key).is_some(), "{}", at(key));
        }

        // Secrets come from the Secret that secret.yaml defines, by keys it has.
        for var in container["env"].as_array().into_iter().flatten() {
            if let Some(secret_ref) = var.pointer("/valueFrom/secretKeyRef") {
                let key = str_at(secret_ref, "/key").unwrap_or("");
                assert_eq!(
                    str_at(secret_ref, "/name"),
                    Some("invalidator"),
                    "{}",
                    at(key)
                );
                assert!(
                    secret["stringData"].get(key).is_some(),
                    "{}",
                    at(&format!("Secret lacks {key}"))
                );
            }
        }
    }
}

#[test]
fn sidecar_readiness_does_not_gate_the_application_pod() {
    // A pod is Ready only when all its containers are: /readyz on the sidecar would take the
    // application out of its Service whenever Redis or Postgres is down, and on every replica
    // whose invalidator is a standby. The standalone Deployment probes /readyz instead.
    let deployments = deployments();
    let find = |name: &str| &deployments.iter().find(|(f, _)| f == name).unwrap().1;
    let sidecar = find("sidecar.yaml");
    let containers = sidecar["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert!(
        containers.len() >= 2,
        "the sidecar pattern has an application container too"
    );
    assert!(
        invalidator_container(sidecar)
            .get("readinessProbe")
            .is_none()
    );
    assert!(
        invalidator_container(find("standalone.yaml"))
            .get("readinessProbe")
            .is_some()
    );
    // The standalone's new pod cannot become ready while the old one holds the slot.
    assert_eq!(
        str_at(find("standalone.yaml"), "/spec/strategy/type"),
        Some("Recreate")
    );
}

#[test]
fn kubernetes_config_and_rules_load_as_the_pod_mounts_them() {
    // Lay the ConfigMaps out as the kubelet does (files are symlinks into a `..data` directory)
    // and as the Deployment mounts them, then load them with the container's environment.
    let config = kubernetes_object(
        "deploy/kubernetes/configmap.yaml",
        "ConfigMap",
        "invalidator-config",
    );
    let rules = kubernetes_object(
        "deploy/kubernetes/configmap.yaml",
        "ConfigMap",
        "invalidator-rules",
    );
    let secret = kubernetes_object("deploy/kubernetes/secret.yaml", "Secret", "invalidator");
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc/invalidator");
    let toml = config["data"]["invalidator.toml"]
        .as_str()
        .expect("invalidator.toml");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("invalidator.toml"), toml).unwrap();
    let rules_dir = etc.join("rules");
    let data = rules_dir.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(data.file_name().unwrap(), rules_dir.join("..data")).unwrap();
    let files = rules["data"].as_object().expect("rules data");
    assert!(!files.is_empty(), "the rules ConfigMap is empty");
    for (name, text) in files {
        assert!(
            name.ends_with(".toml"),
            "rules ConfigMap key {name} does not end in .toml"
        );
        std::fs::write(data.join(name), text.as_str().unwrap()).unwrap();
        std::os::unix::fs::symlink(Path::new("..data").join(name), rules_dir.join(name)).unwrap();
    }

    let (_, deployment) = deployments()
        .into_iter()
        .find(|(f, _)| f == "standalone.yaml")
        .unwrap();
    let container = invalidator_container(&deployment);
    let mut command = Command::new(binary());
    command
        .env_clear()
        .args(["check", "--offline", "--config"])
        .arg(etc.join("invalidator.toml"));
    for var in container["env"].as_array().into_iter().flatten() {
        let name = str_at(var, "/name").unwrap();
        let value = match str_at(var, "/value") {
            Some(value) => value.to_owned(),
            None => {
                let key = str_at(var, "/valueFrom/secretKeyRef/key").expect("a value or a secret");
                secret["stringData"][key].as_str().unwrap().to_owned()
            }
        };
        command.env(name, value);
    }
    let out = command.output().expect("run invalidator check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "check --offline on the ConfigMaps: {text}"
    );
    assert!(text.contains("3 rules on 2 tables"), "{text}");
}

#[test]
fn compose_runs_postgres_with_logical_wal_redis_setup_and_the_sidecar() {
    if runs("docker", &["compose", "version"]) {
        let out = Command::new("docker")
            .args(["compose", "-f"])
            .arg(repo("docker-compose.yml"))
            .args(["config", "--quiet"])
            .output()
            .expect("docker compose config");
        assert!(
            out.status.success(),
            "docker compose config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        println!(
            "deploy: `docker compose` is not available; docker compose config skipped, PyYAML only"
        );
    }
    let compose = yaml("docker-compose.yml").remove(0);
    let services = compose["services"].as_object().expect("services");
    for name in [
        "postgres",
        "redis",
        "migrate",
        "invalidator-setup",
        "invalidator",
    ] {
        assert!(services.contains_key(name), "no service {name}");
    }
    let postgres: Vec<&str> = services["postgres"]["command"]
        .as_array()
        .expect("postgres command as a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        postgres.contains(&"wal_level=logical"),
        "postgres runs with {postgres:?}"
    );
    assert!(
        services["migrate"]["volumes"]
            .to_string()
            .contains("./migrations:"),
        "migrate does not mount ./migrations"
    );

    let setup = &services["invalidator-setup"];
    let run = &services["invalidator"];
    assert_eq!(str_at(setup, "/command/0"), Some("setup"));
    assert_eq!(str_at(run, "/command/0"), Some("run"));
    assert_eq!(
        str_at(run, "/depends_on/invalidator-setup/condition"),
        Some("service_completed_successfully")
    );
    assert_eq!(
        str_at(setup, "/depends_on/migrate/condition"),
        Some("service_completed_successfully")
    );
    for service in [setup, run] {
        assert!(
            service.get("build").is_some(),
            "invalidator services build the Dockerfile"
        );
        assert_eq!(
            str_at(service, "/environment/INVALIDATOR_HTTP_LISTEN"),
            Some("0.0.0.0:9187")
        );
        assert!(
            service["volumes"]
                .to_string()
                .contains("/etc/invalidator/rules")
        );
    }
    assert!(
        run["ports"].to_string().contains(":9187"),
        "/metrics is not published"
    );
}

#[test]
fn compose_publishes_no_port_a_developers_own_servers_use() {
    let compose = yaml("docker-compose.yml").remove(0);
    let services = compose["services"].as_object().expect("services");
    let mut published = 0;
    for (name, service) in services {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port.as_str().expect("ports as strings");
            // "127.0.0.1:${PG_PORT:-15432}:5432": the host side is a variable with a default
            // that is not the standard port of Postgres, Redis or invalidator.
            let host = port
                .rsplit_once(':')
                .map(|(host, _)| host)
                .unwrap_or_default();
            let default = host
                .split_once(":-")
                .and_then(|(_, rest)| rest.strip_suffix('}'))
                .unwrap_or_else(|| panic!("{name}: {port} publishes a fixed host port"));
            assert!(
                !["5432", "6379", "9187"].contains(&default),
                "{name}: {port} clashes with a server of the developer's own"
            );
            published += 1;
        }
    }
    assert_eq!(published, 3, "postgres, redis and the metrics port");
}

#[test]
fn dockerfile_builds_a_release_binary_for_a_non_root_user() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let froms = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(froms >= 2, "not a multi-stage build");
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(lines.iter().any(|l| l.starts_with("COPY --from=builder")));
    let user = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("USER");
    let uid = user[5..].split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {uid}: numeric and not root, so runAsNonRoot can verify it"
    );

    // .dockerignore lets through exactly what the build stage copies.
    let ignore = read(".dockerignore");
    for line in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(
                ignore.lines().any(|l| l.trim() == format!("!{source}")),
                ".dockerignore does not let {source} into the build context"
            );
        }
    }
}

#[test]
fn systemd_unit_verifies_and_is_sandboxed() {
    let unit = read("deploy/systemd/invalidator.service");
    let mut sections = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for line in unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        if line.starts_with('[') {
            sections.insert(line.to_owned());
        } else {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            keys.insert(format!("{key}={value}"));
        }
    }
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(sections.contains(section), "no {section}");
    }
    let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
    for needed in [
        "ExecStart=/usr/local/bin/invalidator run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "TimeoutStopSec=",
        "EnvironmentFile=",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "WantedBy=multi-user.target",
    ] {
        assert!(has(needed), "the unit has no {needed}");
    }

    if !runs("systemd-analyze", &["--version"]) {
        println!("deploy: systemd-analyze is not available; structural check only");
        return;
    }
    // verify insists that ExecStart's binary exists: point it at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("invalidator.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/invalidator", binary())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown or misspelt keys are only warnings, with exit 0: any output fails the test.
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}
