//! Every kernel launch in `src/backend/cuda*.rs` passes the arguments its kernel in `cuda/`
//! declares: as many, and of the same kinds (pointer, 32-bit int, 64-bit int, float). cudarc
//! launches through untyped argument arrays, so a launcher that falls out of step with its
//! kernel would otherwise only show on a GPU, as wrong values or a crash. Arguments of one kind
//! in the wrong order are caught where their names tell: an argument built on the name of
//! another of the kernel's parameters (`k` where `v` goes, `heads` where `kv_heads` goes) fails.
//! Each launch's block size, where it is a constant, is also held to the kernel's
//! `__launch_bounds__`: a larger block is refused at launch.
//!
//! Both sides are read as text. A launch's kernel name is a string literal, a `format!` pattern,
//! or a variable bound by a `let` whose literals name the kernels it may hold; its arguments are
//! an inline `&[Arg::…]` array or a `let args = [Arg::…]` before it. Launches whose name and
//! arguments are both parameters (the `launch_ew*` helpers themselves) are skipped; every other
//! launch must resolve, so a form this reader does not know fails the test rather than going
//! unchecked.

use regex::Regex;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Argument kinds as the launcher's `Arg` variants name them.
fn kind(param: &str) -> char {
    let param = param.trim();
    if param.contains('*') {
        return 'P';
    }
    let ty: Vec<&str> = param.split_whitespace().collect();
    match ty[..ty.len() - 1].join(" ").trim_start_matches("const ") {
        "int" | "int32_t" | "uint32_t" | "unsigned" | "unsigned int" => 'I',
        "int64_t" | "long long" => 'L',
        "uint64_t" | "unsigned long long" => 'U',
        "float" => 'F',
        other => panic!("kernel parameter `{param}`: type {other} has no Arg kind"),
    }
}

/// A parameter's name: its last word, without `*`.
fn param_name(param: &str) -> String {
    let last = param.split_whitespace().last().unwrap_or("");
    last.trim_start_matches('*').to_string()
}

/// name → argument kinds, for every `extern "C"` kernel in cuda/.
fn kernels() -> BTreeMap<String, String> {
    kernel_decls()
        .into_iter()
        .map(|(k, d)| (k, d.kinds))
        .collect()
}

struct Decl {
    kinds: String,
    names: Vec<String>,
    /// The most threads a block may have: `__launch_bounds__`'s first value, a number or a
    /// `#define` of the same file, else CUDA's 1024.
    most: u32,
}

/// Every `extern "C"` kernel in cuda/, by name.
fn kernel_decls() -> BTreeMap<String, Decl> {
    let re = Regex::new(
        r#"extern\s+"C"\s+((?:(?:__launch_bounds__\([^)]*\)|__global__|void)\s+)+)(\w+)\s*\(([^)]*)\)"#,
    )
    .unwrap();
    let bounds = Regex::new(r"__launch_bounds__\(\s*(\w+)").unwrap();
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("cuda")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for m in re.captures_iter(&text) {
            let kinds: String = m[3].split(',').map(kind).collect();
            let most = bounds.captures(&m[1]).map_or(1024, |b| {
                b[1].parse().unwrap_or_else(|_| {
                    let def = Regex::new(&format!(r"#define\s+{}\s+(\d+)", &b[1])).unwrap();
                    let v = def.captures(&text).expect("a #define for the launch bound");
                    v[1].parse().unwrap()
                })
            });
            let names = m[3].split(',').map(param_name).collect();
            out.insert(m[2].to_string(), Decl { kinds, names, most });
        }
    }
    out
}

/// The text from `open` (an opening bracket) to its matching close, exclusive.
fn balanced(text: &str, open: usize) -> &str {
    let b = text.as_bytes();
    let mut depth = 0;
    let mut in_str = false;
    for i in open..b.len() {
        match b[i] {
            b'"' if b[i - 1] != b'\\' => in_str = !in_str,
            b'(' | b'[' | b'{' if !in_str => depth += 1,
            b')' | b']' | b'}' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return &text[open + 1..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced brackets from byte {open}");
}

/// Splits at top-level commas.
fn top_level_args(call: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start, mut in_str) = (Vec::new(), 0i32, 0, false);
    let b = call.as_bytes();
    for i in 0..b.len() {
        match b[i] {
            b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
            b'(' | b'[' | b'{' if !in_str => depth += 1,
            b')' | b']' | b'}' if !in_str => depth -= 1,
            b',' if depth == 0 && !in_str => {
                out.push(call[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if !call[start..].trim().is_empty() {
        out.push(call[start..].trim());
    }
    out
}

/// The statement `let … ident … = …;` last before `at` in `body`, from `let` to its `;`.
fn binding<'a>(body: &'a str, at: usize, ident: &str) -> Option<&'a str> {
    let re = Regex::new(&format!(r"let\s+(?:mut\s+)?\(?\s*{ident}\b")).unwrap();
    let start = re.find_iter(&body[..at]).last()?.start();
    let b = body.as_bytes();
    let mut depth = 0i32;
    for i in start..at {
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b';' if depth == 0 => return Some(&body[start..i]),
            _ => {}
        }
    }
    None
}

/// The kernels a launch's name expression may hold.
fn names(expr: &str, body: &str, at: usize, kernels: &BTreeMap<String, String>) -> Vec<String> {
    let lit = Regex::new(r#""([^"]*)""#).unwrap();
    let hole = Regex::new(r"\{[^}]*\}").unwrap();
    let expr = expr.trim_start_matches('&');
    let source = if expr.starts_with('"') || expr.starts_with("format!") {
        expr
    } else if let Some(stmt) = binding(body, at, expr) {
        stmt
    } else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for m in lit.captures_iter(source) {
        let s = &m[1];
        if s.contains('{') {
            // A format! pattern: each {…} stands for a suffix such as 128 or bf16.
            let pat = hole.replace_all(s, "[a-z0-9]+");
            let re = Regex::new(&format!("^{pat}$")).unwrap();
            out.extend(kernels.keys().filter(|k| re.is_match(k)).cloned());
        } else if kernels.contains_key(s) {
            out.push(s.to_string());
        }
    }
    out
}

/// What one `Arg::K(expr)` passes: its kind, and the name its expression is built on (`x` of
/// `x.ptr`, `cap` of `s.cap as i32`, `stats` of `stats.ptr + 12 * r`; empty for arithmetic).
fn arg_name(expr: &str) -> String {
    let path = Regex::new(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*(?:\(\))?)*").unwrap();
    let Some(m) = path.find(expr.trim()) else {
        return String::new();
    };
    let segs: Vec<&str> = m
        .as_str()
        .split('.')
        .map(|p| p.trim_end_matches("()"))
        .filter(|p| *p != "ptr")
        .collect();
    segs.last().unwrap_or(&"").to_string()
}

/// The arguments of an argument-list expression, as (kind, name): an inline `[Arg::…]`, or a
/// variable built before `at` by `let v = [Arg::…]` / `vec![…]` / `w.to_vec()`, then
/// `v.extend(…)` and `v.push(…)`.
fn arg_list(expr: &str, body: &str, at: usize) -> Option<Vec<(char, String)>> {
    let arg = Regex::new(r"Arg::([PILFU])\(").unwrap();
    let expr = expr.trim_start_matches('&').trim();
    if expr.contains("Arg::") {
        return Some(
            arg.captures_iter(expr)
                .map(|c| {
                    let open = c.get(0).unwrap().end() - 1;
                    (c[1].chars().next().unwrap(), arg_name(balanced(expr, open)))
                })
                .collect(),
        );
    }
    let ident = expr.trim_end_matches(".to_vec()");
    if !Regex::new(r"^\w+$").unwrap().is_match(ident) {
        return None;
    }
    let stmt = binding(body, at, ident)?;
    let rhs = stmt.split_once('=')?.1.trim();
    let mut list = arg_list(rhs, body, body.find(stmt)?)?;
    // The extends and pushes between the binding and the use, in order.
    let start = body.find(stmt)? + stmt.len();
    let grow = Regex::new(&format!(r"\b{ident}\.(extend|push)\(")).unwrap();
    for m in grow.find_iter(&body[start..at]) {
        let open = start + m.end() - 1;
        let inner = balanced(body, open);
        list.extend(arg_list(inner, body, open)?);
    }
    Some(list)
}

/// `text` without `//` comments (line count kept): a comma in a comment is not an argument.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| {
            let mut in_str = false;
            let b = l.as_bytes();
            for i in 0..b.len() {
                match b[i] {
                    b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
                    b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return &l[..i],
                    _ => {}
                }
            }
            l
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The CUDA backend's source files (src/backend/cuda*.rs), where every launch is.
fn launcher_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(root().join("src/backend"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("cuda") && f.ends_with(".rs"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "launcher files: {files:?}");
    files
}

#[test]
fn every_launch_passes_what_its_kernel_declares() {
    let decls = kernel_decls();
    let kernels = kernels();
    let files = launcher_files();
    let sources: Vec<String> = files
        .iter()
        .map(|f| {
            strip_comments(&std::fs::read_to_string(root().join("src/backend").join(f)).unwrap())
        })
        .collect();
    // A block dimension: a number, or a `const` of the backend's sources (`as u32` dropped).
    let dim = |e: &str| -> Option<u32> {
        let e = e.trim().trim_end_matches(" as u32").trim();
        e.parse().ok().or_else(|| {
            let re = Regex::new(&format!(r"const\s+{e}\s*:\s*\w+\s*=\s*(\d+)\s*;")).ok()?;
            sources.iter().find_map(|t| re.captures(t)?[1].parse().ok())
        })
    };
    let mut blocks_checked = 0;
    let mut named = 0;
    assert!(
        kernels.len() >= 40,
        "{} kernels found in cuda/",
        kernels.len()
    );
    let call = Regex::new(r"\.(launch|launch_ew|launch_ew_vec)\(").unwrap();
    let mut checked = BTreeMap::<String, usize>::new();
    let mut problems = Vec::new();
    for (file, text) in files.iter().zip(&sources) {
        for m in call.find_iter(text) {
            let open = m.end() - 1;
            let line = text[..open].lines().count();
            let args = top_level_args(balanced(text, open));
            let fn_start = text[..open].rfind("fn ").unwrap_or(0);
            let body = &text[fn_start..];
            let at = m.start() - fn_start;
            let (name_expr, list) = match (m.as_str(), args.len()) {
                (".launch(", 5) => (args[0], args[4]),
                (".launch_ew(" | ".launch_ew_vec(", 3) => (args[0], args[2]),
                // cudarc's own `LaunchArgs::launch(cfg)`, inside `launch_func`.
                (".launch(", 1) if args[0] == "cfg" => continue,
                _ => {
                    problems.push(format!(
                        "{file}:{line}: a launch of {} arguments",
                        args.len()
                    ));
                    continue;
                }
            };
            let passed = arg_list(list, body, at);
            let kinds: Option<String> = passed.as_ref().map(|l| l.iter().map(|a| a.0).collect());
            let names = names(name_expr, body, at, &kernels);
            if names.is_empty() && kinds.is_none() {
                // A helper passing its own parameters through (launch_ew and the like).
                continue;
            }
            let Some(kinds) = kinds else {
                problems.push(format!("{file}:{line}: arguments `{list}` not resolved"));
                continue;
            };
            if names.is_empty() {
                problems.push(format!(
                    "{file}:{line}: kernel name `{name_expr}` not resolved"
                ));
                continue;
            }
            // Threads a block: more than the kernel's launch bound and the launch is refused.
            let block = match m.as_str() {
                ".launch(" => args[2].trim_start_matches('(').trim_end_matches(')'),
                _ => "EW_BLOCK, 1, 1",
            };
            let threads: Option<u32> = block.split(',').map(dim).product();
            for n in &names {
                if let Some(t) = threads {
                    blocks_checked += 1;
                    let most = decls[n].most;
                    if t > most {
                        problems.push(format!(
                            "{file}:{line}: {n} launched with {t} threads a block, its bound is {most}"
                        ));
                    }
                }
            }
            // An argument built on the name of another of the kernel's parameters sits in the
            // wrong place: `k` passed where `v` goes, `heads` where `kv_heads` goes.
            for n in &names {
                let params = &decls[n].names;
                for (i, (_, got)) in passed.iter().flatten().enumerate() {
                    let own = params.get(i).map(String::as_str);
                    if own == Some(got.as_str()) {
                        named += 1;
                        continue;
                    }
                    if let Some(j) = params.iter().position(|p| p == got) {
                        problems.push(format!(
                            "{file}:{line}: {n}'s argument {i} ({}) is built on `{got}`, the name of its argument {j}",
                            own.unwrap_or("?")
                        ));
                    }
                }
            }
            for n in names {
                let want = &kernels[&n];
                if *want != kinds {
                    problems.push(format!(
                        "{file}:{line}: {n} declares {want} ({} arguments), the launch passes {kinds} ({})",
                        want.len(),
                        kinds.len()
                    ));
                }
                *checked.entry(n).or_default() += 1;
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Every kernel the launchers name was checked; the ones never launched from Rust are
    // listed so that a launch this reader missed shows up here.
    let unchecked: Vec<&String> = kernels
        .keys()
        .filter(|k| !checked.contains_key(*k))
        .collect();
    println!(
        "{} kernels checked at their launches; not launched through `launch`: {unchecked:?}",
        checked.len()
    );
    println!("{blocks_checked} launches' block sizes checked against the kernels' bounds");
    println!("{named} arguments built on their own parameter's name, none on another's");
    assert!(named >= 150, "only {named} arguments matched by name");
    assert!(
        blocks_checked >= 30,
        "only {blocks_checked} block sizes checked"
    );
    assert!(
        checked.len() >= 35,
        "only {} kernels checked",
        checked.len()
    );
}
