//! The runtime's modules import downward only: `runtime/lib.rs` lists them
//! from the bottom up, and a module's sources may name (`crate::x`) only
//! itself and modules listed before it. This keeps the graph acyclic and
//! the day's data flow readable (ARCHITECTURE.md, "Architecture Invariant").

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn runtime() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime")
}

/// The modules of `lib.rs`, in order.
fn modules() -> Vec<String> {
    let lib = std::fs::read_to_string(runtime().join("lib.rs")).unwrap();
    lib.lines().filter_map(|l| l.strip_prefix("pub mod")).map(|l| l.trim().split(';').next().unwrap().to_string()).collect()
}

/// Every `.rs` file below `dirs`.
fn rust_files(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

/// Every `.rs` file of module `name` (a file or a folder).
fn sources(name: &str) -> Vec<PathBuf> {
    let file = runtime().join(format!("{name}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let out = rust_files(vec![runtime().join(name)]);
    assert!(!out.is_empty(), "module `{name}` has no sources");
    out
}

/// The top-level modules a source names through `crate::`, in paths and in
/// `use crate::{a, b::c}` groups.
fn named_modules(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first path segment of each top-level item of the group.
            let (mut depth, mut item_start) = (0usize, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

#[test]
fn every_runtime_module_imports_only_modules_below_it() {
    let order = modules();
    assert!(order.len() > 10, "lib.rs lists the modules: {order:?}");
    let mut violations = Vec::new();
    for (rank, module) in order.iter().enumerate() {
        for file in sources(module) {
            let text = std::fs::read_to_string(&file).unwrap();
            for named in named_modules(&text) {
                match order.iter().position(|m| *m == named) {
                    Some(r) if r <= rank => {}
                    Some(_) => violations.push(format!("{}: `{module}` names `{named}`, which is above it", file.display())),
                    None => violations.push(format!("{}: names `crate::{named}`, not a module of lib.rs", file.display())),
                }
            }
        }
    }
    assert!(violations.is_empty(), "imports that point up:\n{}", violations.join("\n"));
}

#[test]
fn every_source_file_belongs_to_a_listed_module() {
    let listed: BTreeSet<PathBuf> = modules().iter().flat_map(|m| sources(m)).collect();
    for entry in std::fs::read_dir(runtime()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "lib.rs" || name == "bin" {
            continue;
        }
        let covered = listed.contains(&path) || listed.iter().any(|f| f.starts_with(&path));
        assert!(covered, "{} is not a module listed in lib.rs", path.display());
    }
}

#[test]
fn the_scanner_sees_paths_and_groups() {
    let found = named_modules("use crate::{journal::{Body, Journal}, ids::DeviceId};\nlet x = crate::budget::ROW_TILE;");
    assert_eq!(found, ["budget", "ids", "journal"].map(String::from).into_iter().collect());
}

#[test]
fn the_trainer_never_reads_the_compiled_profile() {
    let trainer = Path::new(env!("CARGO_MANIFEST_DIR")).join("trainer");
    let files = rust_files(vec![trainer.join("src"), trainer.join("examples"), trainer.join("tests")]);
    assert!(files.len() > 10, "only {} trainer sources found", files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("profile::ACTIVE"), "{} uses the runtime's compiled profile", path.display());
    }
}
