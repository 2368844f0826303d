//! The module graph of `src/` has no cycles.
//!
//! Reads every `src/**/*.rs` file (the crate roots `lib.rs` and `main.rs`
//! excepted: nothing names the root), maps it to its module path, and takes
//! each `crate::a::b` and `super::a` path (grouped `use crate::{a, b::c}`
//! included) as an edge to the file that owns the longest prefix of it. Code
//! after a file's first `#[cfg(test)]` is left out: tests may reach anywhere.
//! This is the same reading as `module-cycles`; it is text, not name
//! resolution, so a path it cannot see (a `use` through a re-export of a
//! child) is not an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

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

#[test]
fn src_has_no_module_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_src(&root, &root, &mut files);
    assert!(files.len() > 20, "read only {} files of src/", files.len());
    let found = cycles(&files);
    let groups: Vec<String> = tangles(&files).iter().map(|g| g.join(", ")).collect();
    assert!(
        found.is_empty() && groups.is_empty(),
        "import cycles between modules of src/:\n{}\nmodules that reach each other:\n{}",
        found.join("\n"),
        groups.join("\n")
    );
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
