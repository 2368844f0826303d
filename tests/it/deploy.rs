//! The deployment files (deploy/Dockerfile, deploy/compose.yaml,
//! deploy/k8s/*.yaml) and scripts/cluster-local against the real binary and
//! the real `Config`: every YAML parses; every `--flag` and `SWITCHBOARD_*`
//! variable they give `switchboard` is one that `switchboard serve --help`
//! lists; the TOML they carry parses as a `Config` (unknown keys refused)
//! and, with the flags and environment of the node that reads it, passes
//! `validate`; the NATS configuration they give `nats-server` passes its
//! own check (`-t`). No container runtime runs here, so this is what keeps
//! the files from drifting from the code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_yaml_ng::Value;
use switchboard::Config;
use switchboard::config::{ClusterConfig, Secret};
use tokio::process::Command;

use crate::natsd::nats_bin;
use crate::support::DEADLINE;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What `switchboard serve --help` offers.
struct Help {
    flags: BTreeSet<String>,
    envs: BTreeSet<String>,
}

/// Runs the built binary's `serve --help`, with no `SWITCHBOARD_*` variable
/// set (clap prints their values), and collects its flags and variables.
async fn serve_help() -> Help {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--help"])
        .env_clear()
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .expect("serve --help finishes")
        .expect("serve --help runs");
    assert!(out.status.success(), "serve --help failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("help is UTF-8");
    let flags: BTreeSet<String> = text
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_owned())
        .collect();
    let envs: BTreeSet<String> = text
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap_or_default().to_owned())
        .collect();
    assert!(
        flags.contains("--cluster") && envs.contains("SWITCHBOARD_CLUSTER"),
        "help not understood: {flags:?} {envs:?}"
    );
    Help { flags, envs }
}

/// One way the deployment files start `switchboard`: its arguments (after
/// the binary) and the environment variables it is given.
#[derive(Debug, Default, Clone)]
struct Invocation {
    origin: String,
    args: Vec<String>,
    env: BTreeMap<String, EnvValue>,
}

/// An environment variable's value as a deployment file gives it.
#[derive(Debug, Clone)]
enum EnvValue {
    Literal(String),
    /// From a Kubernetes Secret: its value is not in the files.
    Secret,
    /// The pod's name (Kubernetes `fieldRef: metadata.name`).
    PodName,
}

/// What is wrong with `inv`'s flags and variables, one line per mistake.
fn unknown_options(help: &Help, inv: &Invocation) -> Vec<String> {
    let mut wrong = Vec::new();
    if inv.args.first().map(String::as_str) != Some("serve") {
        wrong.push(format!(
            "{}: does not run `serve`: {:?}",
            inv.origin, inv.args
        ));
    }
    for arg in inv.args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap_or(arg);
        if !help.flags.contains(flag) {
            wrong.push(format!(
                "{}: `{flag}` is not a flag of `switchboard serve`",
                inv.origin
            ));
        }
    }
    for name in inv.env.keys().filter(|n| n.starts_with("SWITCHBOARD_")) {
        if !help.envs.contains(name) {
            wrong.push(format!(
                "{}: `{name}` is not a variable `switchboard serve` reads",
                inv.origin
            ));
        }
    }
    wrong
}

/// Every YAML document of every `.yaml`/`.yml` file under deploy/, with
/// YAML merge keys (`<<:`) applied, by file.
fn deploy_yaml() -> BTreeMap<String, Vec<Value>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("deploy dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("deploy"), &mut files);
    let mut docs = BTreeMap::new();
    for path in files {
        let text = read(&path);
        let name = path
            .strip_prefix(root())
            .expect("under the root")
            .display()
            .to_string();
        let mut parsed = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{name}: merge keys: {e}"));
            if !value.is_null() {
                parsed.push(value);
            }
        }
        assert!(!parsed.is_empty(), "{name} holds no document");
        docs.insert(name, parsed);
    }
    docs
}

fn str_list(value: &Value, what: &str) -> Vec<String> {
    match value {
        Value::Null => Vec::new(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .unwrap_or_else(|| panic!("{what}: not a string: {i:?}"))
                    .to_owned()
            })
            .collect(),
        other => panic!("{what}: not a list: {other:?}"),
    }
}

/// The Dockerfile's `ENV` variables and its `CMD` as arguments of its
/// `ENTRYPOINT`, which must be the binary.
fn dockerfile() -> Invocation {
    let text = read(&root().join("deploy/Dockerfile"));
    // Instructions, with `\`-continued lines joined.
    let joined = text.replace("\\\n", " ");
    let mut inv = Invocation {
        origin: "deploy/Dockerfile".into(),
        ..Invocation::default()
    };
    let mut entrypoint = None;
    for line in joined.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (name, value) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("Dockerfile ENV not NAME=value: {pair}"));
                inv.env
                    .insert(name.to_owned(), EnvValue::Literal(value.to_owned()));
            }
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            let argv: Vec<String> = serde_json::from_str(rest)
                .unwrap_or_else(|e| panic!("Dockerfile ENTRYPOINT is not exec form: {e}"));
            entrypoint = Some(argv);
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            inv.args = serde_json::from_str(rest)
                .unwrap_or_else(|e| panic!("Dockerfile CMD is not exec form: {e}"));
        }
    }
    assert_eq!(
        entrypoint.as_deref(),
        Some(&["switchboard".to_owned()][..]),
        "the image's ENTRYPOINT is the binary"
    );
    inv
}

/// Compose's `${NAME:-default}`: the default (the files' own value).
fn compose_value(value: &str) -> String {
    match value
        .strip_prefix("${")
        .and_then(|v| v.strip_suffix('}'))
        .and_then(|v| v.split_once(":-"))
    {
        Some((_, default)) => default.to_owned(),
        None => value.to_owned(),
    }
}

/// The switchboard services of compose.yaml, each on top of the image's
/// environment.
fn compose_nodes(doc: &Value, image: &Invocation) -> Vec<Invocation> {
    let services = doc["services"].as_mapping().expect("compose services");
    let mut nodes = Vec::new();
    for (name, service) in services {
        let name = name.as_str().expect("service name");
        let is_switchboard = service["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("switchboard"));
        if !is_switchboard {
            continue;
        }
        assert!(
            service["entrypoint"].is_null(),
            "compose service {name} keeps the image's entrypoint"
        );
        let origin = format!("deploy/compose.yaml service {name}");
        let mut env = image.env.clone();
        match &service["environment"] {
            Value::Mapping(map) => {
                for (k, v) in map {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => panic!("{origin}: env value {other:?}"),
                    };
                    let k = k.as_str().expect("env name").to_owned();
                    env.insert(k, EnvValue::Literal(compose_value(&v)));
                }
            }
            Value::Sequence(_) => {
                for pair in str_list(&service["environment"], &origin) {
                    let (k, v) = pair.split_once('=').expect("NAME=value");
                    env.insert(k.to_owned(), EnvValue::Literal(compose_value(v)));
                }
            }
            Value::Null => {}
            other => panic!("{origin}: environment {other:?}"),
        }
        nodes.push(Invocation {
            origin,
            args: str_list(&service["command"], name),
            env,
        });
    }
    nodes
}

/// The containers running the switchboard image in a Kubernetes workload.
fn k8s_containers(doc: &Value) -> Vec<&Value> {
    doc["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .map(|cs| {
            cs.iter()
                .filter(|c| {
                    c["image"]
                        .as_str()
                        .is_some_and(|i| i.starts_with("switchboard"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn k8s_invocation(origin: String, container: &Value, image: &Invocation) -> Invocation {
    let mut args = str_list(&container["command"], &origin);
    // A `command` replaces the image's entrypoint: it must be the binary.
    if !args.is_empty() {
        assert_eq!(args.remove(0), "switchboard", "{origin}: command");
    }
    args.extend(str_list(&container["args"], &origin));
    let mut env = image.env.clone();
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            EnvValue::Literal(v.to_owned())
        } else if !var["valueFrom"]["secretKeyRef"].is_null() {
            EnvValue::Secret
        } else if var["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("metadata.name") {
            EnvValue::PodName
        } else {
            panic!("{origin}: env {name}: a source this test does not know")
        };
        env.insert(name, value);
    }
    Invocation { origin, args, env }
}

/// The `switchboard` invocations of scripts/cluster-local: its logical
/// lines (with `\`-continued lines joined) that run `"$SB" serve`.
fn cluster_local() -> Vec<Invocation> {
    let text = read(&root().join("scripts/cluster-local"));
    let joined = text.replace("\\\n", " ");
    let mut invocations = Vec::new();
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words
            .windows(2)
            .position(|w| w[0] == "\"$SB\"" && w[1] == "serve")
        else {
            continue;
        };
        let args = words[at + 1..]
            .iter()
            .take_while(|w| !matches!(**w, ">" | ">>" | "&" | "2>" | "|") && !w.starts_with('>'))
            .map(|w| w.trim_matches('"').to_owned())
            .collect();
        invocations.push(Invocation {
            origin: "scripts/cluster-local".into(),
            args,
            env: BTreeMap::new(),
        });
    }
    assert!(
        !invocations.is_empty(),
        "scripts/cluster-local starts no node with \"$SB\" serve"
    );
    // Variables named anywhere in the script are the server's.
    let mut env = BTreeMap::new();
    for (i, _) in text.match_indices("SWITCHBOARD_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        env.insert(name, EnvValue::Secret);
    }
    invocations.push(Invocation {
        origin: "scripts/cluster-local (variables)".into(),
        args: vec!["serve".into()],
        env,
    });
    invocations
}

/// The value following `flag` in `args` (`--flag value` or `--flag=value`).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(flag).and_then(|rest| rest.strip_prefix('='))
        }
    })
}

fn cluster(config: &mut Config) -> &mut ClusterConfig {
    config.cluster.get_or_insert_with(ClusterConfig::default)
}

/// `toml` as the node of `inv` would run it: the file, then its
/// environment, then its flags, as `main.rs` merges them. The few options
/// the deployment files use are mapped here; another one fails the test
/// until it is taught here.
fn effective_config(toml: &str, inv: &Invocation) -> Config {
    let mut config: Config = toml::from_str(toml)
        .unwrap_or_else(|e| panic!("{}: its TOML is not a Config: {e}", inv.origin));
    let pod_name = "switchboard-7c9d8f6b5-x2kq9";
    let mut set = |origin: &str, key: &str, value: &EnvValue| {
        let text = match value {
            EnvValue::Literal(v) => v.clone(),
            // A Secret's value is not in the files; the shortest the
            // server accepts stands for it.
            EnvValue::Secret => "s".repeat(32),
            EnvValue::PodName => pod_name.to_owned(),
        };
        let addr = |t: &str| {
            t.parse()
                .unwrap_or_else(|e| panic!("{origin}: {key} = {t}: {e}"))
        };
        match key {
            "config" | "no_tls" => {}
            "listen" => config.listen = addr(&text),
            "plain_listen" => config.plain_listen = Some(addr(&text)),
            "admin_listen" => config.admin_listen = Some(addr(&text)),
            "data_dir" => config.data_dir = text.into(),
            "log_format" => {
                config.log_format = toml::from_str::<Config>(&format!("log_format = {text:?}"))
                    .unwrap_or_else(|e| panic!("{origin}: log_format {text}: {e}"))
                    .log_format;
            }
            "admin_token" => config.admin_token = Some(Secret::new(text)),
            "auth_hs256_secret" => config.auth_hs256_secret = Some(Secret::new(text)),
            "cluster" => {
                cluster(&mut config).urls = text.split(',').map(str::to_owned).collect();
            }
            "node_id" => cluster(&mut config).node_id = Some(text),
            other => panic!("{origin}: `{other}` is not mapped by tests/it/deploy.rs"),
        }
    };
    for (name, value) in &inv.env {
        if let Some(key) = name.strip_prefix("SWITCHBOARD_") {
            set(&inv.origin, &key.to_lowercase(), value);
        }
    }
    for (i, arg) in inv.args.iter().enumerate() {
        let Some(flag) = arg.strip_prefix("--") else {
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n, v.to_owned()),
            None if flag == "no-tls" => (flag, String::new()),
            None => (
                flag,
                inv.args
                    .get(i + 1)
                    .unwrap_or_else(|| panic!("{}: {arg} has no value", inv.origin))
                    .clone(),
            ),
        };
        set(
            &inv.origin,
            &name.replace('-', "_"),
            &EnvValue::Literal(value),
        );
    }
    config
}

/// `nats-server -t -c FILE` with `env`: whether the file is a valid config.
async fn nats_config_valid(text: &str, env: &[(&str, &str)]) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, text).expect("write nats.conf");
    let out = Command::new(nats_bin())
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .expect("nats-server -t finishes")
        .expect("nats-server runs");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The resource of `kind` named `name` in `docs`.
fn find<'a>(docs: &'a BTreeMap<String, Vec<Value>>, kind: &str, name: &str) -> &'a Value {
    docs.values()
        .flatten()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

#[tokio::test]
async fn deploy_files_use_only_flags_variables_and_keys_that_exist() {
    let help = serve_help().await;
    let docs = deploy_yaml();
    let image = dockerfile();

    let mut invocations = vec![image.clone()];
    let compose = docs
        .get("deploy/compose.yaml")
        .and_then(|d| d.first())
        .expect("deploy/compose.yaml");
    let nodes = compose_nodes(compose, &image);
    assert_eq!(nodes.len(), 3, "compose runs 3 switchboard nodes");
    invocations.extend(nodes.iter().cloned());
    let mut workloads = Vec::new();
    for (file, file_docs) in &docs {
        for doc in file_docs {
            for container in k8s_containers(doc) {
                let origin = format!(
                    "{file} {} {}",
                    doc["kind"].as_str().unwrap_or("?"),
                    doc["metadata"]["name"].as_str().unwrap_or("?")
                );
                let inv = k8s_invocation(origin, container, &image);
                workloads.push((doc, container, inv.clone()));
                invocations.push(inv);
            }
        }
    }
    assert_eq!(
        workloads.len(),
        1,
        "one switchboard Deployment in deploy/k8s"
    );
    invocations.extend(cluster_local());

    let wrong: Vec<String> = invocations
        .iter()
        .flat_map(|inv| unknown_options(&help, inv))
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Compose: the TOML of every node, with its flags and environment.
    let compose_toml = compose["configs"]["switchboard-toml"]["content"]
        .as_str()
        .expect("compose config switchboard-toml");
    for node in &nodes {
        let config = effective_config(compose_toml, node);
        config
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", node.origin));
        let cluster = config.cluster.expect("compose nodes are cluster nodes");
        assert_eq!(cluster.replicas, 3, "{}: replicas", node.origin);
        assert_eq!(
            cluster.urls.len(),
            3,
            "{}: all three NATS servers",
            node.origin
        );
    }
    let nats_services = compose["services"]
        .as_mapping()
        .expect("services")
        .values()
        .filter(|s| s["image"].as_str().is_some_and(|i| i.starts_with("nats:")))
        .count();
    assert_eq!(nats_services, 3, "compose runs 3 NATS servers");

    // Kubernetes: the ConfigMap's TOML as the Deployment's pods run it.
    let (deployment, container, inv) = &workloads[0];
    assert_eq!(deployment["kind"].as_str(), Some("Deployment"));
    let configmap = find(&docs, "ConfigMap", "switchboard-config");
    let toml = configmap["data"]["switchboard.toml"]
        .as_str()
        .expect("switchboard.toml in the ConfigMap");
    let config = effective_config(toml, inv);
    config
        .validate()
        .unwrap_or_else(|e| panic!("{}: {e}", inv.origin));
    let cluster = config.cluster.clone().expect("a [cluster] section");
    assert_eq!(cluster.replicas, 3);
    // The config file is where --config says, mounted from the ConfigMap.
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    let config_path = flag_value(&inv.args, "--config").expect("--config");
    assert!(
        mounts.contains(&config_path),
        "{config_path} is not mounted"
    );
    for (key, path) in [
        ("tls_cert", &config.tls_cert),
        ("tls_key", &config.tls_key),
        ("data_dir", &config.data_dir),
    ] {
        assert!(
            mounts.iter().any(|m| path.starts_with(m)),
            "{key} = {} is on no volume",
            path.display()
        );
    }
    let secret_file = config.auth_hs256_secret_file.as_ref().expect("a token key");
    assert!(mounts.iter().any(|m| secret_file.starts_with(m)));

    // Every NATS server of the StatefulSet is in cluster.urls.
    let nats = find(&docs, "StatefulSet", "nats");
    let nats_replicas = nats["spec"]["replicas"].as_u64().expect("nats replicas");
    assert_eq!(nats_replicas, 3, "R3 needs 3 NATS servers");
    let service = nats["spec"]["serviceName"].as_str().expect("serviceName");
    for i in 0..nats_replicas {
        let url = format!("nats://nats-{i}.{service}:4222");
        assert!(cluster.urls.contains(&url), "{url} not in cluster.urls");
    }

    // Probes on the admin port, which is admin_listen's.
    let admin_port = config.admin_listen.expect("admin_listen").port();
    let ports = container["ports"].as_sequence().expect("ports");
    let admin = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("a port named admin");
    assert_eq!(admin["containerPort"].as_u64(), Some(u64::from(admin_port)));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(get["port"].as_str(), Some("admin"), "{probe}");
    }

    // preStop: the drain, then a sleep of the drain window. The grace
    // period covers every path to a stop: the sleep, then at SIGTERM a
    // drain (if the preStop's did not start) and up to three shutdown
    // graces (the drain's bound, the sessions, the admin listener).
    let pre_stop = str_list(
        &container["lifecycle"]["preStop"]["exec"]["command"],
        "preStop",
    )
    .join(" ");
    assert!(
        pre_stop.contains(&format!("127.0.0.1:{admin_port}/admin/api/drain"))
            && pre_stop.contains("-X POST"),
        "preStop does not POST the drain: {pre_stop}"
    );
    let sleep: u64 = pre_stop
        .split("sleep ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("preStop sleeps no whole seconds: {pre_stop}"));
    assert!(
        sleep * 1000 >= config.drain_window_ms,
        "preStop sleeps {sleep} s, the drain window is {} ms",
        config.drain_window_ms
    );
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace * 1000 >= sleep * 1000 + config.drain_window_ms + 3 * config.shutdown_grace_ms,
        "terminationGracePeriodSeconds {grace} does not cover the drain and shutdown grace"
    );

    // The NATS configuration of the StatefulSet, checked by nats-server.
    let nats_conf = find(&docs, "ConfigMap", "nats-config")["data"]["nats.conf"]
        .as_str()
        .expect("nats.conf");
    nats_config_valid(nats_conf, &[("POD_NAME", "nats-0")])
        .await
        .unwrap_or_else(|e| panic!("deploy/k8s/nats.yaml nats.conf: {e}"));
}

/// The check above is not vacuous: a flag, a variable or a config key
/// that does not exist is caught.
#[tokio::test]
async fn a_made_up_flag_variable_or_key_is_caught() {
    let help = serve_help().await;
    let mut inv = dockerfile();
    assert!(unknown_options(&help, &inv).is_empty());
    inv.args.push("--cluster-replicas=3".into());
    inv.env
        .insert("SWITCHBOARD_REPLICAS".into(), EnvValue::Literal("3".into()));
    let wrong = unknown_options(&help, &inv);
    assert_eq!(wrong.len(), 2, "{wrong:?}");
    assert!(toml::from_str::<Config>("[cluster]\nreplica = 3\n").is_err());
    assert!(
        nats_config_valid("jetstream { store_dirr: /data }\n", &[])
            .await
            .is_err()
    );
}

/// docs/cluster.md's `[cluster]` table against `ClusterConfig::default()`:
/// every key is listed, with its real default.
#[test]
fn the_cluster_keys_in_docs_are_the_real_ones_with_their_defaults() {
    let docs = read(&root().join("docs/cluster.md"));
    let section = docs
        .split("## Configuration: `[cluster]`")
        .nth(1)
        .expect("docs/cluster.md has the [cluster] reference");
    let rows: Vec<(String, String)> = section
        .lines()
        .skip_while(|l| !l.starts_with("| key | default |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect();
    let defaults = format!("{:?}", ClusterConfig::default());
    for (key, cell) in &rows {
        // `none`, or a value computed at start (`<hostname>-<pid>`): unset.
        if cell == "none" || cell.starts_with("`<") {
            assert!(
                defaults.contains(&format!(" {key}: None"))
                    || defaults.contains(&format!(" {key}: []")),
                "docs say `cluster.{key}` is unset by default: {defaults}"
            );
            continue;
        }
        let value = match cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
            Some(text) => format!("{text:?}"),
            None => cell.clone(),
        };
        let parsed: ClusterConfig = toml::from_str(&format!("{key} = {value}"))
            .unwrap_or_else(|e| panic!("docs row `cluster.{key}` = {value}: {e}"));
        assert_eq!(
            format!("{parsed:?}"),
            defaults,
            "docs say `cluster.{key}` defaults to {value}"
        );
    }
    let listed: BTreeSet<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
    let fields: BTreeSet<&str> = defaults
        .trim_start_matches("ClusterConfig {")
        .trim_end_matches('}')
        .split(", ")
        .filter_map(|f| f.split_once(": ").map(|(k, _)| k.trim()))
        .collect();
    assert_eq!(listed, fields, "the docs table lists every [cluster] key");
}

/// The options deploy/compose.yaml, deploy/k8s/nats.yaml and
/// scripts/cluster-local give `nats-server` are ones its `--help` lists.
#[tokio::test]
async fn nats_server_options_exist() {
    let out = Command::new(nats_bin())
        .arg("--help")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .expect("nats-server --help finishes")
        .expect("nats-server runs");
    let help = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let known: BTreeSet<&str> = help
        .split([' ', ',', '\n', '\t'])
        .filter(|w| w.starts_with('-'))
        .collect();
    assert!(
        known.contains("--jetstream") && known.contains("--routes"),
        "{help}"
    );

    let mut given: Vec<(String, Vec<String>)> = Vec::new();
    let docs = deploy_yaml();
    let compose = &docs["deploy/compose.yaml"][0];
    for (name, service) in compose["services"].as_mapping().expect("services") {
        if service["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("nats:"))
        {
            let name = format!(
                "deploy/compose.yaml service {}",
                name.as_str().unwrap_or("?")
            );
            given.push((name.clone(), str_list(&service["command"], &name)));
        }
    }
    let nats = find(&docs, "StatefulSet", "nats");
    for c in nats["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers")
    {
        given.push((
            "deploy/k8s/nats.yaml args".into(),
            str_list(&c["args"], "args"),
        ));
        let pre_stop = str_list(&c["lifecycle"]["preStop"]["exec"]["command"], "preStop");
        given.push(("deploy/k8s/nats.yaml preStop".into(), pre_stop));
    }
    let script = read(&root().join("scripts/cluster-local")).replace("\\\n", " ");
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(at) = words.iter().position(|w| *w == "\"$NATS\"") {
            if words.get(at + 1).is_some_and(|w| w.starts_with('-')) {
                let args = words[at + 1..].iter().map(|w| (*w).to_owned()).collect();
                given.push(("scripts/cluster-local".into(), args));
            }
        }
    }
    assert!(
        given.len() >= 5,
        "nats-server invocations not found: {given:?}"
    );
    let wrong: Vec<String> = given
        .iter()
        .flat_map(|(origin, args)| {
            args.iter()
                .filter(|a| a.starts_with('-') && !known.contains(a.as_str()))
                .map(move |a| format!("{origin}: `{a}` is not a nats-server option"))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
