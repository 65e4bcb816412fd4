//! The declared layering of `src/` (written in `src/lib.rs`), checked against the code.
//!
//! Goal: every `crate::` path in `src/` goes down the order in [`LAYERS`], nothing names
//! `agent` or `cli` (the composition root and the front end), and no files import each other in
//! a loop. Method: read every `.rs` file under `src/`, take the module paths it names outside
//! comments (`crate::a::b`, `super::x`, a child module's name in `use`), resolve each to the
//! file that defines it, and check both rules. `tests::an_upward_import_is_caught` shows the
//! check failing on an import that goes up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules of `src/`, bottom to top. A module may name only modules of a lower
/// layer; modules on one line (one layer) do not name each other.
const LAYERS: &[&[&str]] = &[
    &["error", "env", "prng", "codec", "durable", "name", "units"],
    &["metrics"],
    &["io"],
    &["dirty"],
    &["disk"],
    &["nbd"],
    &["transfer", "lease"],
    &["migrate", "seed"],
    &["journal"],
    &["jobs"],
    &["api"],
    &["agent", "manager"],
    &["demo"],
    &["cli"],
];

/// Modules no other module may name: they sit on top and wire or render everything.
const NAMED_BY_NONE: &[&str] = &["agent", "cli"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The source of one file without comments (doc links are not imports) and string literals.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        // Character literals of a quote would open a string.
        let line = line.replace("'\\\"'", "' '").replace("'\"'", "' '");
        let code = line.split("//").next().unwrap_or("");
        let mut in_string = false;
        let mut prev = ' ';
        for c in code.chars() {
            if c == '"' && prev != '\\' {
                in_string = !in_string;
            } else if !in_string {
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// The module path of a file under `src/`: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    match last.as_str() {
        "mod.rs" | "lib.rs" | "main.rs" => {}
        name => parts.push(name.trim_end_matches(".rs").to_string()),
    }
    parts
}

/// The file defining the longest prefix of `path` that is a module.
fn resolve(src: &Path, path: &[String]) -> Option<PathBuf> {
    (1..=path.len()).rev().find_map(|len| {
        let base = path[..len].iter().collect::<PathBuf>();
        [
            src.join(&base).with_extension("rs"),
            src.join(&base).join("mod.rs"),
        ]
        .into_iter()
        .find(|candidate| candidate.is_file())
    })
}

/// Tokens of Rust code: identifiers, `::`, and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".to_string());
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
            i += 1;
        }
    }
    out
}

/// Module paths named in `code` that start with `crate::`, `super::` or (in a folder's
/// `mod.rs`) a child module's name, as absolute paths; `use a::{b, c::d}` is expanded.
fn named_paths(
    code: &str,
    here: &[String],
    is_dir_module: bool,
    children: &[String],
) -> Vec<Vec<String>> {
    let tokens = tokens(code);
    let mut found = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let after_path = i > 0 && tokens[i - 1] == "::";
        let base = match tokens[i].as_str() {
            _ if after_path => None,
            "crate" => Some(Vec::new()),
            "super" => {
                let mut parent = here.to_vec();
                parent.pop();
                Some(parent)
            }
            child if is_dir_module && children.iter().any(|c| c == child) => {
                let mut path = here.to_vec();
                path.push(child.to_string());
                Some(path)
            }
            _ => None,
        };
        match base {
            Some(path) if tokens.get(i + 1).is_some_and(|t| t == "::") => {
                i = path_tree(&tokens, i + 2, path, &mut found);
            }
            _ => i += 1,
        }
    }
    found
}

/// Reads `a::b::{c, d::e}` from `tokens[at..]` onto `path`; returns the index after it.
fn path_tree(
    tokens: &[String],
    mut at: usize,
    mut path: Vec<String>,
    found: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match tokens.get(at).map(String::as_str) {
            Some("{") => {
                at += 1;
                loop {
                    if tokens.get(at).is_some_and(|t| t == "}") {
                        return at + 1;
                    }
                    at = path_tree(tokens, at, path.clone(), found);
                    match tokens.get(at).map(String::as_str) {
                        Some(",") => at += 1,
                        Some("}") => return at + 1,
                        _ => return at,
                    }
                }
            }
            Some("super") => {
                path.pop();
            }
            Some(ident)
                if ident != "self" && ident.chars().all(|c| c.is_alphanumeric() || c == '_') =>
            {
                path.push(ident.to_string());
            }
            _ => {
                found.push(path);
                return at;
            }
        }
        at += 1;
        if tokens.get(at).is_some_and(|t| t == "::") {
            at += 1;
        } else {
            found.push(path);
            return at;
        }
    }
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|entry| entry.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// File -> files it names (edges from a folder's `mod.rs` down to its own children are left
/// out: a folder re-exporting its parts is its face, not a dependency).
fn import_graph(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = BTreeMap::new();
    for file in files {
        if file == src.join("main.rs") {
            continue;
        }
        let here = module_path(src, &file);
        let is_dir_module = matches!(
            file.file_name().and_then(|n| n.to_str()),
            Some("mod.rs" | "lib.rs")
        );
        let dir = file.parent().expect("parent");
        let children: Vec<String> = if is_dir_module {
            std::fs::read_dir(dir)
                .expect("read dir")
                .filter_map(|entry| {
                    let path = entry.ok()?.path();
                    let name = path.file_stem()?.to_str()?.to_string();
                    (name != "mod" && name != "lib" && name != "main").then_some(name)
                })
                .collect()
        } else {
            Vec::new()
        };
        let text = std::fs::read_to_string(&file).expect("read file");
        // A file's unit tests may use another file's test helpers; that is not layering.
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let code = code_of(text);
        let mut edges = BTreeSet::new();
        for path in named_paths(&code, &here, is_dir_module, &children) {
            let Some(target) = resolve(src, &path) else {
                continue;
            };
            let own_child = is_dir_module && target.starts_with(dir);
            if target != file && !own_child {
                edges.insert(target);
            }
        }
        graph.insert(file, edges);
    }
    graph
}

/// The top-level module of a file (`src/a/...` and `src/a.rs` are `a`).
fn top_module(src: &Path, file: &Path) -> String {
    module_path(src, file)
        .first()
        .cloned()
        .unwrap_or_else(|| "lib".to_string())
}

/// Every rule broken by `graph`, one line each.
fn violations(src: &Path, graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<String> {
    let mut found = Vec::new();
    let show = |file: &Path| {
        file.strip_prefix(src.parent().unwrap())
            .unwrap()
            .display()
            .to_string()
    };
    for (file, targets) in graph {
        let from = top_module(src, file);
        if from == "lib" {
            continue;
        }
        let Some(from_layer) = layer_of(&from) else {
            found.push(format!(
                "{}: module `{from}` is in no layer of LAYERS",
                show(file)
            ));
            continue;
        };
        for target in targets {
            let to = top_module(src, target);
            if to == from || to == "lib" {
                continue;
            }
            if NAMED_BY_NONE.contains(&to.as_str()) {
                found.push(format!(
                    "{} names `{to}`, which nothing may name",
                    show(file)
                ));
                continue;
            }
            match layer_of(&to) {
                Some(to_layer) if to_layer < from_layer => {}
                _ => found.push(format!(
                    "{} (`{from}`) names {} (`{to}`): not below it",
                    show(file),
                    show(target)
                )),
            }
        }
    }
    found.extend(cycles(graph).into_iter().map(|cycle| {
        let names: Vec<String> = cycle.iter().map(|file| show(file)).collect();
        format!("import loop: {}", names.join(" -> "))
    }));
    found
}

/// Files that import each other in a loop (strongly connected components of 2+ files).
fn cycles(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    // Reachability closure: small graphs (about 100 files), so the plain way is fine.
    let nodes: Vec<&PathBuf> = graph.keys().collect();
    let reach = |from: &PathBuf| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(node) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&PathBuf, BTreeSet<PathBuf>> =
        nodes.iter().map(|node| (*node, reach(node))).collect();
    let mut done = BTreeSet::new();
    let mut loops = Vec::new();
    for node in &nodes {
        if done.contains(*node) || !reaches[node].contains(*node) {
            continue;
        }
        let component: Vec<PathBuf> = nodes
            .iter()
            .filter(|other| reaches[node].contains(**other) && reaches[**other].contains(*node))
            .map(|other| (*other).clone())
            .collect();
        done.extend(component.iter().cloned());
        loops.push(component);
    }
    loops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn src_follows_the_declared_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let graph = import_graph(&src);
        let found = violations(&src, &graph);
        assert!(
            found.is_empty(),
            "layering broken (order in src/lib.rs and LAYERS in tests/layering.rs):\n{}",
            found.join("\n")
        );
    }

    // Goal: the check is not vacuous: an upward import, a name of `agent` and a loop are each
    // reported. Method: a copy of `src/` in a temporary directory with one bad line added to
    // `dirty/mod.rs` at a time.
    #[test]
    fn an_upward_import_is_caught() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (line, expect) in [
            ("use crate::journal::Record;\n", "names src/journal"),
            ("use crate::agent::Agent;\n", "which nothing may name"),
        ] {
            let copy = tempfile::tempdir().expect("tempdir");
            let copy_src = copy.path().join("src");
            copy_tree(&src, &copy_src);
            let target = copy_src.join("dirty").join("mod.rs");
            let text = std::fs::read_to_string(&target).expect("read");
            std::fs::write(&target, format!("{line}{text}")).expect("write");
            let found = violations(&copy_src, &import_graph(&copy_src));
            assert!(
                found.iter().any(|v| v.contains(expect)),
                "`{}` not caught: {found:?}",
                line.trim()
            );
        }
    }

    // Goal: two files naming each other are a loop even inside one module.
    #[test]
    fn a_loop_inside_a_module_is_caught() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("dirty")).expect("mkdir");
        std::fs::write(src.join("lib.rs"), "pub mod dirty;\n").expect("write");
        std::fs::write(src.join("dirty/mod.rs"), "mod a;\nmod b;\n").expect("write");
        std::fs::write(src.join("dirty/a.rs"), "use super::b::B;\npub struct A;\n").expect("w");
        std::fs::write(src.join("dirty/b.rs"), "use super::a::A;\npub struct B;\n").expect("w");
        let found = violations(&src, &import_graph(&src));
        assert!(
            found.iter().any(|v| v.starts_with("import loop")),
            "{found:?}"
        );
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read") {
            let path = entry.expect("entry").path();
            let dest = to.join(path.file_name().expect("name"));
            if path.is_dir() {
                copy_tree(&path, &dest);
            } else {
                std::fs::copy(&path, &dest).expect("copy");
            }
        }
    }
}
