//! No crate of the workspace has a cycle in its module graph.
//!
//! The crates are the root package and every `[workspace] members` entry of
//! the root `Cargo.toml` (a trailing `/*` taken as every package below
//! it); each crate's `src/` is read on its own, since a path names a module
//! of its own crate only. Every `src/**/*.rs` file (the crate roots
//! `lib.rs` and `main.rs` excepted: nothing names the root) is mapped to
//! its module path, and each `crate::a::b` and `super::a` path (grouped
//! `use crate::{a, b::c}` included) is taken as an edge to the file that
//! owns the longest prefix of it. Code after a file's first `#[cfg(test)]`
//! is left out: tests may reach anywhere. This is the same reading as
//! `module-cycles`; it is text, not name resolution, so a path it cannot
//! see (a `use` through a re-export of a child) is not an edge, and one in
//! a comment is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// The module path of a file relative to `src/`, or `None` for a crate root.
fn module_of(rel: &Path) -> Option<Module> {
    let mut parts: Module = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    if parts.is_empty() || (parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main")) {
        return None;
    }
    Some(parts)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads an identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    &s[..end]
}

/// Expands the path that starts at `s` (just after `crate::` or the
/// `super::`s), prefixed by `base`, into every full path it names.
fn expand(base: &[String], s: &str, out: &mut Vec<Module>) {
    let mut path = base.to_vec();
    let mut rest = s.trim_start();
    loop {
        if let Some(inner) = rest.strip_prefix('{') {
            for item in split_group(inner) {
                let item = item.trim();
                if item.is_empty() || item == "self" || item.starts_with("self ") {
                    if !path.is_empty() {
                        out.push(path.clone());
                    }
                    continue;
                }
                expand(&path, item, out);
            }
            return;
        }
        let id = ident(rest);
        if id.is_empty() {
            break;
        }
        path.push(id.to_string());
        rest = &rest[id.len()..];
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
}

/// The top-level items of a `{...}` group (`s` starts after the `{`).
fn split_group(s: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&s[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    items
}

/// Every path a file's text names through `crate::` or `super::`.
fn paths_named(module: &[String], text: &str) -> Vec<Module> {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        if text[..i].ends_with(|c: char| is_ident(c) || c == ':' || c == '$') {
            continue;
        }
        expand(&[], &text[i + "crate::".len()..], &mut out);
    }
    for (i, _) in text.match_indices("super::") {
        if text[..i].ends_with(|c: char| is_ident(c) || c == ':') {
            continue;
        }
        let mut base: Module = module.to_vec();
        let mut rest = &text[i..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        expand(&base, rest, &mut out);
    }
    out
}

/// Edges between file modules, with the names that make each one.
fn graph(files: &[(Module, String)]) -> BTreeMap<Module, BTreeMap<Module, BTreeSet<String>>> {
    let known: BTreeSet<&Module> = files.iter().map(|(m, _)| m).collect();
    let mut edges = BTreeMap::new();
    for (module, text) in files {
        let targets: &mut BTreeMap<Module, BTreeSet<String>> =
            edges.entry(module.clone()).or_default();
        for path in paths_named(module, text) {
            let owner = (1..=path.len())
                .rev()
                .map(|k| path[..k].to_vec())
                .find(|p| known.contains(p));
            if let Some(owner) = owner
                && &owner != module
            {
                let name = path.last().cloned().unwrap_or_default();
                targets.entry(owner).or_default().insert(name);
            }
        }
    }
    edges
}

/// One path per cycle found by a depth-first search (each back edge closes
/// one), as `a -> b -> a` with the names that tie each step.
fn cycles(files: &[(Module, String)]) -> Vec<String> {
    let edges = graph(files);
    let mut state: BTreeMap<&Module, u8> = BTreeMap::new(); // 1 on the stack, 2 done
    let mut found = Vec::new();
    for start in edges.keys() {
        if state.contains_key(start) {
            continue;
        }
        let mut stack: Vec<(&Module, Vec<&Module>)> =
            vec![(start, edges[start].keys().rev().collect())];
        state.insert(start, 1);
        while let Some((node, next)) = stack.last_mut() {
            let node: &Module = node;
            match next.pop() {
                Some(to) => match state.get(to) {
                    None => {
                        state.insert(to, 1);
                        let succ = edges
                            .get(to)
                            .map(|e| e.keys().rev().collect())
                            .unwrap_or_default();
                        stack.push((to, succ));
                    }
                    Some(1) => {
                        let from = stack.iter().position(|(m, _)| *m == to).unwrap_or(0);
                        let mut path: Vec<&Module> =
                            stack[from..].iter().map(|(m, _)| *m).collect();
                        path.push(to);
                        let mut text = path[0].join("::");
                        for w in path.windows(2) {
                            let names = &edges[w[0]][w[1]];
                            let names: Vec<&str> = names.iter().map(String::as_str).collect();
                            text.push_str(&format!(
                                " -({})-> {}",
                                names.join(", "),
                                w[1].join("::")
                            ));
                        }
                        found.push(text);
                    }
                    Some(_) => {}
                },
                None => {
                    state.insert(node, 2);
                    stack.pop();
                }
            }
        }
    }
    found
}

/// The groups of two or more modules that all reach each other (the
/// strongly connected components), each sorted: every module in a cycle
/// is in one, which the paths above need not show.
fn tangles(files: &[(Module, String)]) -> Vec<Vec<String>> {
    let edges = graph(files);
    let reach = |from: &Module| -> BTreeSet<Module> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for to in edges.get(&m).into_iter().flat_map(|e| e.keys()) {
                if seen.insert(to.clone()) {
                    todo.push(to.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&Module, BTreeSet<Module>> =
        edges.keys().map(|m| (m, reach(m))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for (m, from_m) in &reached {
        let group: Vec<String> = reached
            .iter()
            .filter(|(w, from_w)| from_m.contains(**w) && from_w.contains(*m))
            .map(|(w, _)| w.join("::"))
            .collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

fn read_src(dir: &Path, root: &Path, out: &mut Vec<(Module, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_src(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under src");
            if let Some(module) = module_of(rel) {
                let text = std::fs::read_to_string(&path).expect("read source");
                out.push((module, text));
            }
        }
    }
}

/// The `src/` of every crate of the workspace rooted at `workspace`, as
/// paths relative to it: the root package's, then each member's.
fn crate_srcs(workspace: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(workspace.join("Cargo.toml")).expect("read Cargo.toml");
    let manifest: toml::Table = toml::from_str(&text).expect("parse Cargo.toml");
    let mut dirs = Vec::new();
    if manifest.contains_key("package") {
        dirs.push(PathBuf::new());
    }
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for member in members {
        let member = member.as_str().expect("a member is a path");
        match member.strip_suffix("/*") {
            Some(parent) => {
                let mut found: Vec<PathBuf> = std::fs::read_dir(workspace.join(parent))
                    .expect("read a members glob's directory")
                    .map(|e| e.expect("dir entry").path())
                    .filter(|p| p.join("Cargo.toml").is_file())
                    .map(|p| Path::new(parent).join(p.file_name().expect("named")))
                    .collect();
                found.sort();
                dirs.extend(found);
            }
            None => dirs.push(PathBuf::from(member)),
        }
    }
    dirs.into_iter().map(|d| d.join("src")).collect()
}

/// The modules of the crate whose `src/` is `src`.
fn read_crate(src: &Path) -> Vec<(Module, String)> {
    let mut files = Vec::new();
    read_src(src, src, &mut files);
    files
}

/// What is wrong with each crate of the workspace (none when no crate has
/// a cycle), with how many modules each crate has.
fn workspace_cycles(workspace: &Path) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut sizes = BTreeMap::new();
    let mut problems = Vec::new();
    for src in crate_srcs(workspace) {
        let name = src.to_string_lossy().into_owned();
        let files = read_crate(&workspace.join(&src));
        sizes.insert(name.clone(), files.len());
        let found = cycles(&files);
        let groups: Vec<String> = tangles(&files).iter().map(|g| g.join(", ")).collect();
        if !found.is_empty() || !groups.is_empty() {
            problems.push(format!(
                "import cycles between modules of {name}/:\n{}\nmodules that reach each other:\n{}",
                found.join("\n"),
                groups.join("\n")
            ));
        }
    }
    (sizes, problems)
}

#[test]
fn no_crate_of_the_workspace_has_module_cycles() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (sizes, problems) = workspace_cycles(workspace);
    // The crates known today are all read: a manifest read wrongly would
    // otherwise pass by reading nothing. A new member is read without
    // being named here.
    for known in [
        "src",
        "protocol/src",
        "client/src",
        "loadtest/src",
        "bench/tokio-broadcast/src",
        "bench/js-ceiling/src",
    ] {
        assert!(sizes.contains_key(known), "{known} not read: {sizes:?}");
    }
    assert!(
        sizes["src"] > 20,
        "read only {} files of src/",
        sizes["src"]
    );
    assert!(
        sizes["loadtest/src"] > 10,
        "read only {} files of loadtest/src/",
        sizes["loadtest/src"]
    );
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

fn file(module: &str, text: &str) -> (Module, String) {
    let module = module.split("::").map(str::to_string).collect();
    (module, text.to_string())
}

#[test]
fn a_cycle_through_grouped_and_super_paths_is_found() {
    let files = vec![
        file(
            "hub",
            "use crate::{config::Config, session::{Outbox, wire::Frame}};",
        ),
        file("session", "pub mod wire;"),
        file("session::wire", "use super::super::hub::Hub;"),
        file("config", "//! nothing"),
    ];
    let found = cycles(&files);
    assert_eq!(
        found,
        vec!["hub -(Frame)-> session::wire -(Hub)-> hub".to_string()],
        "edges: {:?}",
        graph(&files)
    );
    assert_eq!(tangles(&files), vec![vec!["hub", "session::wire"]]);
}

#[test]
fn paths_in_test_code_and_downward_edges_make_no_cycle() {
    let files = vec![
        file("hub", "use crate::session::Outbox;"),
        file(
            "session",
            "fn f() {}\n#[cfg(test)]\nmod tests { use crate::hub::Hub; }",
        ),
        file(
            "store::writer",
            "use super::tables::Record; use crate::store::Store;",
        ),
        file("store::tables", "//! leaf"),
        file("store", "pub use writer::Writer;"),
    ];
    assert_eq!(
        cycles(&files),
        Vec::<String>::new(),
        "edges: {:?}",
        graph(&files)
    );
    assert_eq!(tangles(&files), Vec::<Vec<String>>::new());
}

/// Writes `text` at `rel` under `root`, making the directories.
fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

#[test]
fn a_cycle_in_a_member_crate_fails_the_workspace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write(
        root,
        "Cargo.toml",
        "[package]\nname = \"root\"\n\n[workspace]\nmembers = [\"leaf\", \"tools/*\"]\n",
    );
    // The root crate only reaches down; the same names in another crate
    // are not edges of this one.
    write(root, "src/lib.rs", "pub mod a; pub mod b;");
    write(root, "src/a.rs", "use crate::b::B;");
    write(root, "src/b.rs", "pub struct B;");
    write(root, "leaf/Cargo.toml", "[package]\nname = \"leaf\"\n");
    write(root, "leaf/src/lib.rs", "pub mod metrics;");
    write(root, "leaf/src/metrics.rs", "pub struct Metrics;");
    // A member found through the glob, with the loop that loadtest had.
    write(root, "tools/gen/Cargo.toml", "[package]\nname = \"gen\"\n");
    write(
        root,
        "tools/gen/src/lib.rs",
        "pub mod metrics; pub mod report;",
    );
    write(
        root,
        "tools/gen/src/metrics.rs",
        "pub struct Metrics { soak: Option<crate::report::Summary> }",
    );
    write(
        root,
        "tools/gen/src/report.rs",
        "use crate::metrics::Metrics;\npub struct Summary;",
    );

    let (sizes, problems) = workspace_cycles(root);
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        vec![
            ("leaf/src".to_string(), 1),
            ("src".to_string(), 2),
            ("tools/gen/src".to_string(), 2),
        ]
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("import cycles between modules of tools/gen/src/:\n")
            && problems[0].contains("metrics -(Summary)-> report -(Metrics)-> metrics")
            && problems[0].ends_with("metrics, report"),
        "{}",
        problems[0]
    );

    // Cut, as loadtest's was: the summary moves to a module of its own.
    write(
        root,
        "tools/gen/src/lib.rs",
        "pub mod metrics; pub mod report; pub mod summary;",
    );
    write(
        root,
        "tools/gen/src/metrics.rs",
        "pub struct Metrics { soak: Option<crate::summary::Summary> }",
    );
    write(
        root,
        "tools/gen/src/report.rs",
        "use crate::{metrics::Metrics, summary::Summary};",
    );
    write(root, "tools/gen/src/summary.rs", "pub struct Summary;");
    let (_, problems) = workspace_cycles(root);
    assert!(problems.is_empty(), "{problems:?}");
}
