//! The library's source files form a layered graph: no file reaches, through `crate::`,
//! `super::`, `self::` or child-module paths, a file that reaches it back. The edges are read
//! from the source text (comments and string literals stripped), so that a new cycle fails CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module of the crate: its path (`["cuda", "device"]`) and the file that holds it.
#[derive(Debug)]
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// Every file module under `src/` except the binaries, keyed by module path.
fn modules(src: &Path) -> BTreeMap<Vec<String>, Module> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(src).unwrap().to_path_buf();
            if p.is_dir() {
                if rel != Path::new("bin") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let mut path: Vec<String> = rel
                .parent()
                .unwrap()
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            if stem != "mod" && stem != "lib" {
                path.push(stem);
            }
            out.insert(path.clone(), Module { path, file: p });
        }
    }
    out
}

/// The source with comments, string and char literals blanked out (newlines kept).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'#') | Some(b'"')) {
            // raw string r"..." / r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if b.get(i) == Some(&b'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == b'\'' && b.get(i + 2) == Some(&b'\'') {
            out.push_str("' '");
            i += 3;
        } else if c == b'\'' && b.get(i + 1) == Some(&b'\\') {
            let mut j = i + 2;
            while j < b.len() && b[j] != b'\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The modules a file refers to: every `crate::a::b`, `super::a`, `self::a` path, and in
/// `use` items the paths that start with a child module's name, resolved to the deepest file
/// module they name. Inline modules (`mod tests { .. }`) are followed so that their `super::`
/// resolves correctly.
fn edges(m: &Module, all: &BTreeMap<Vec<String>, Module>) -> BTreeSet<Vec<String>> {
    let text = strip(&std::fs::read_to_string(&m.file).unwrap());
    let children: BTreeSet<String> = all
        .keys()
        .filter(|k| k.len() == m.path.len() + 1 && k[..m.path.len()] == m.path[..])
        .map(|k| k.last().unwrap().clone())
        .collect();
    // the deepest file module reached by walking `segs` from `base`
    let resolve = |base: Vec<String>, segs: &[String]| -> Vec<String> {
        let mut cur = base;
        for s in segs {
            let mut next = cur.clone();
            next.push(s.clone());
            if all.contains_key(&next) {
                cur = next;
            } else {
                break;
            }
        }
        cur
    };
    let mut out = BTreeSet::new();
    let tokens: Vec<(usize, String)> = {
        let mut v = Vec::new();
        let mut cur = String::new();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if is_ident(c) {
                if cur.is_empty() {
                    start = i;
                }
                cur.push(c);
            } else {
                if !cur.is_empty() {
                    v.push((start, std::mem::take(&mut cur)));
                }
                if !c.is_whitespace() {
                    v.push((i, c.to_string()));
                }
            }
        }
        if !cur.is_empty() {
            v.push((start, cur));
        }
        v
    };
    // inline module nesting: (name, brace depth at which it opened)
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut in_use = false;
    let mut use_prefix_stack: Vec<Vec<String>> = Vec::new();
    let mut i = 0;
    // a path that starts at token i: its segments joined by `::`
    let path_at = |i: usize| -> (Vec<String>, usize) {
        let mut segs = vec![tokens[i].1.clone()];
        let mut j = i + 1;
        while j + 2 < tokens.len()
            && tokens[j].1 == ":"
            && tokens[j + 1].1 == ":"
            && tokens[j + 2].1.chars().all(is_ident)
        {
            segs.push(tokens[j + 2].1.clone());
            j += 3;
        }
        (segs, j)
    };
    while i < tokens.len() {
        let t = tokens[i].1.as_str();
        match t {
            "{" => {
                depth += 1;
                if in_use {
                    use_prefix_stack.push(Vec::new());
                }
                i += 1;
                continue;
            }
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                if in_use {
                    use_prefix_stack.pop();
                }
                i += 1;
                continue;
            }
            ";" => {
                in_use = false;
                use_prefix_stack.clear();
                i += 1;
                continue;
            }
            "mod" if tokens.get(i + 2).is_some_and(|t| t.1 == "{") => {
                inline.push((tokens[i + 1].1.clone(), depth));
                i += 2;
                continue;
            }
            "use" => {
                in_use = true;
                i += 1;
                // a use item: resolve its first path, and every path inside braces relative to
                // it (one level is enough for `use super::{a, b::c}` and `use crate::{x, y}`)
                let (segs, j) = path_at(i);
                let mut here = m.path.clone();
                here.extend(inline.iter().map(|(n, _)| n.clone()));
                let base_of = |segs: &[String]| -> Option<(Vec<String>, usize)> {
                    match segs[0].as_str() {
                        "crate" => Some((Vec::new(), 1)),
                        "super" => {
                            let mut b = here.clone();
                            let mut k = 0;
                            while segs.get(k).is_some_and(|s| s == "super") {
                                b.pop();
                                k += 1;
                            }
                            Some((b, k))
                        }
                        "self" => Some((here.clone(), 1)),
                        s if inline.is_empty() && children.contains(s) => Some((m.path.clone(), 0)),
                        _ => None,
                    }
                };
                if let Some((base, skip)) = base_of(&segs) {
                    // `use a::b::{c, d::e}`: the braces extend the prefix
                    let prefix: Vec<String> = segs[skip..].to_vec();
                    if tokens.get(j).is_some_and(|t| t.1 == ":")
                        && tokens.get(j + 2).is_some_and(|t| t.1 == "{")
                    {
                        let mut k = j + 3;
                        let mut d = 1;
                        while k < tokens.len() && d > 0 {
                            match tokens[k].1.as_str() {
                                "{" => d += 1,
                                "}" => d -= 1,
                                s if d == 1
                                    && s.chars().all(is_ident)
                                    && (tokens[k - 1].1 == "{" || tokens[k - 1].1 == ",") =>
                                {
                                    // `self` in the group names the prefix module itself
                                    let (inner, _) = path_at(k);
                                    let mut full = prefix.clone();
                                    full.extend(inner.into_iter().filter(|s| s != "self"));
                                    out.insert(resolve(base.clone(), &full));
                                }
                                _ => {}
                            }
                            k += 1;
                        }
                        in_use = false;
                        i = k;
                        continue;
                    }
                    out.insert(resolve(base, &prefix));
                }
                i = j;
                continue;
            }
            "crate" | "super" | "self"
                if tokens.get(i + 1).is_some_and(|t| t.1 == ":")
                    && (i == 0 || tokens[i - 1].1 != ":") =>
            {
                let (segs, j) = path_at(i);
                let mut here = m.path.clone();
                here.extend(inline.iter().map(|(n, _)| n.clone()));
                let (base, skip) = match t {
                    "crate" => (Vec::new(), 1),
                    "self" => (here, 1),
                    _ => {
                        let mut b = here;
                        let mut k = 0;
                        while segs.get(k).is_some_and(|s| s == "super") {
                            b.pop();
                            k += 1;
                        }
                        (b, k)
                    }
                };
                out.insert(resolve(base, &segs[skip..]));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    // a module's own file, and paths into its own inline modules, are not edges
    out.remove(&m.path);
    out.retain(|p| all.contains_key(p));
    out
}

fn name(p: &[String]) -> String {
    if p.is_empty() {
        "lib".into()
    } else {
        p.join("::")
    }
}

/// Every elementary cycle is too many to list; report each strongly connected component with
/// more than one file (Tarjan), which is empty exactly when the graph has no cycle.
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        on: BTreeSet<&'a Vec<String>>,
        stack: Vec<&'a Vec<String>>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Vec<String>) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in &t.g[v] {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(name(w));
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let all = modules(&src);
    all.values()
        .map(|m| (m.path.clone(), edges(m, &all)))
        .collect()
}

/// Cycles inside files that another engineer owns, reported to them and tolerated until they
/// are gone: `src/cpu/mod.rs` defines helpers (`as_f32`, `from_f32`, the kernel types) that its
/// children `direct.rs` and `naive.rs` use while it re-exports from them; moving the helpers
/// to a leaf file (e.g. `src/cpu/convert.rs`) removes it. A cycle among any other files fails.
const KNOWN: &[&[&str]] = &[];

#[test]
fn source_files_form_no_import_cycle() {
    let g = graph();
    let mut found = cycles(&g);
    found.retain(|comp| {
        let known = KNOWN
            .iter()
            .any(|k| comp.iter().all(|v| k.contains(&v.as_str())));
        if known {
            println!(
                "known cycle, to be removed by its owner: {}",
                comp.join(", ")
            );
        }
        !known
    });
    let mut msg = String::new();
    for comp in &found {
        msg.push_str(&format!("cycle among: {}\n", comp.join(", ")));
        for v in comp {
            let key: Vec<String> = if v == "lib" {
                Vec::new()
            } else {
                v.split("::").map(String::from).collect()
            };
            let into: Vec<String> = g[&key]
                .iter()
                .map(|p| name(p))
                .filter(|n| comp.contains(n))
                .collect();
            msg.push_str(&format!("  {v} -> {}\n", into.join(", ")));
        }
    }
    assert!(found.is_empty(), "{msg}");
}

/// The scanner itself finds what it must: a known edge of each kind, and a cycle in a graph
/// that has one (so that the test above cannot pass by reading nothing).
#[test]
fn the_scanner_sees_edges_and_cycles() {
    let g = graph();
    let key = |s: &str| -> Vec<String> { s.split("::").map(String::from).collect() };
    // `use crate::error::...` in conv.rs
    assert!(
        g[&key("conv")].contains(&key("error")),
        "{:?}",
        g[&key("conv")]
    );
    // lib.rs re-exports from its child modules
    assert!(g[&Vec::new()].contains(&key("tensor")));
    assert!(g.len() > 20, "only {} modules found", g.len());
    let mut with_cycle = g.clone();
    with_cycle
        .get_mut(&key("error"))
        .unwrap()
        .insert(key("conv"));
    assert!(!cycles(&with_cycle).is_empty());
    // stripping keeps code and drops comments and strings
    let s = strip("use crate::a; // crate::b\nlet x = \"crate::c\"; /* crate::d */ '{';");
    assert!(s.contains("crate::a") && !s.contains("crate::b"));
    assert!(!s.contains("crate::c") && !s.contains("crate::d") && !s.contains('{'));
}
