//! What ptxas reported for each kernel when build.rs compiled `cuda/*.cu`: registers, stack,
//! spills, static shared memory, and its performance advisories (a serialized wgmma pipeline,
//! C7511/C7520). Without a GPU this is the one performance property of a kernel that can be
//! checked: a spill or a serialized wgmma costs the hot kernels far more than any tuning gains.

use anyhow::{bail, Context, Result};

/// ptxas's `-v` output from the build, or "" when the binary was built without nvcc.
pub static PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));

/// The kernels' entry points, as build.rs found them in `cuda/*.cu` ("" without nvcc).
pub fn kernel_names() -> Vec<&'static str> {
    option_env!("EMPO_CUDA_KERNEL_NAMES")
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .collect()
}

/// One kernel compiled for one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    /// The SASS target, e.g. `sm_90a`.
    pub arch: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub static_smem_bytes: u32,
    /// ptxas's advisories naming this kernel, as printed (e.g. "(C7511) Potential Performance
    /// Loss: wgmma.mma_async instructions are serialized …").
    pub advisories: Vec<String>,
}

impl KernelResources {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// The number before `unit` in `text` ("936 bytes stack frame" → 936 for "bytes stack frame").
fn number_before(text: &str, unit: &str) -> Option<u32> {
    let head = &text[..text.find(unit)?];
    head.split([' ', ','])
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// The text between the first pair of single quotes after `marker`.
fn quoted_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let start = rest.find('\'')? + 1;
    let len = rest[start..].find('\'')?;
    Some(&rest[start..start + len])
}

/// Parses ptxas `-v` output: one entry per "Compiling entry function 'K' for 'A'" block. Each
/// ptxas run (one per target) prints its advisories before its entries, so an advisory belongs
/// to the target of the next entry (or of the last, at the end).
pub fn parse(report: &str) -> Result<Vec<KernelResources>> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut pending: Vec<(String, String)> = Vec::new(); // (kernel, advisory)
    let mut advisories: Vec<(String, String, String)> = Vec::new(); // (kernel, arch, advisory)
    for (i, line) in report.lines().enumerate() {
        let at = || format!("ptxas report line {}: {line:?}", i + 1);
        if let Some(kernel) = quoted_after(line, "Compiling entry function") {
            let arch = quoted_after(line, &format!("'{kernel}' for"))
                .with_context(|| format!("{}: no target", at()))?;
            for (k, a) in pending.drain(..) {
                advisories.push((k, arch.to_string(), a));
            }
            out.push(KernelResources {
                kernel: kernel.to_string(),
                arch: arch.to_string(),
                registers: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
                static_smem_bytes: 0,
                advisories: Vec::new(),
            });
        } else if line.contains("bytes stack frame") {
            let Some(cur) = out.last_mut() else {
                bail!("{}: before any entry function", at());
            };
            let (Some(stack), Some(st), Some(ld)) = (
                number_before(line, "bytes stack frame"),
                number_before(line, "bytes spill stores"),
                number_before(line, "bytes spill loads"),
            ) else {
                bail!("{}: expected stack, spill store and spill load bytes", at());
            };
            (cur.stack_bytes, cur.spill_store_bytes, cur.spill_load_bytes) = (stack, st, ld);
        } else if line.contains(": Used ") && line.contains(" registers") {
            let Some(cur) = out.last_mut() else {
                bail!("{}: before any entry function", at());
            };
            cur.registers = number_before(line, " registers")
                .with_context(|| format!("{}: no register count", at()))?;
            cur.static_smem_bytes = number_before(line, " bytes smem").unwrap_or(0);
        } else if line.contains("(C7") {
            if let Some(kernel) = quoted_after(line, "in the function") {
                let text = line.split_once(": ").map_or(line, |(_, t)| t).trim();
                pending.push((kernel.to_string(), text.to_string()));
            }
        }
    }
    let last_arch = out.last().map(|r| r.arch.clone()).unwrap_or_default();
    advisories.extend(pending.drain(..).map(|(k, a)| (k, last_arch.clone(), a)));
    for (kernel, arch, text) in advisories {
        match out
            .iter_mut()
            .find(|r| r.kernel == kernel && r.arch == arch)
        {
            Some(r) => r.advisories.push(text),
            None => bail!("ptxas advisory for {kernel} ({arch}), which it never compiled: {text}"),
        }
    }
    Ok(out)
}

/// The report as a table, one row per kernel, one column group per target.
pub fn format_table(rows: &[KernelResources]) -> String {
    let mut archs: Vec<&str> = rows.iter().map(|r| r.arch.as_str()).collect();
    archs.sort_unstable();
    archs.dedup();
    let mut kernels: Vec<&str> = rows.iter().map(|r| r.kernel.as_str()).collect();
    kernels.sort_unstable();
    kernels.dedup();
    let width = kernels.iter().map(|k| k.len()).max().unwrap_or(6).max(6);
    let mut s = format!("{:width$}", "kernel");
    for a in &archs {
        s += &format!(" | {a:>7} regs  stack  spill st/ld  smem");
    }
    s += "\n";
    let mut notes = String::new();
    for k in &kernels {
        s += &format!("{k:width$}");
        for a in &archs {
            match rows.iter().find(|r| r.kernel == *k && r.arch == *a) {
                Some(r) => {
                    s += &format!(
                        " | {:>12} {:>6} {:>6}/{:<5} {:>5}",
                        r.registers,
                        r.stack_bytes,
                        r.spill_store_bytes,
                        r.spill_load_bytes,
                        r.static_smem_bytes
                    );
                    for adv in &r.advisories {
                        notes += &format!("{k} ({a}): {adv}\n");
                    }
                }
                None => s += &format!(" | {:>12} {:>6} {:>6} {:5} {:>5}", "-", "", "", "", ""),
            }
        }
        s += "\n";
    }
    if !notes.is_empty() {
        s += "ptxas advisories:\n";
        s += &notes;
    }
    s
}
