//! Builds the PTX of `kernels/*.cu` into `OUT_DIR`.
//!
//! With an `nvcc` (looked for at `$NVCC`, `$CUDA_HOME/bin/nvcc`, the repository's
//! `.cuda/bin/nvcc` from `scripts/setup-cuda`, `/usr/local/cuda/bin/nvcc`, then
//! `PATH`) each `kernels/<name>.cu` is compiled to `<name>.ptx` with the flags in
//! `kernels/nvcc.flags`. Without one, the checked-in `kernels/ptx/<name>.ptx` are
//! used. PTX whose ISA is newer than 9.0 (CUDA 13.0) is rejected by 580-series
//! drivers, so output of a newer compiler is discarded in favour of the checked-in
//! PTX. `LS_PTX_SOURCE` tells the crate which was embedded.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Newest PTX ISA the embedded PTX may carry (CUDA 13.0).
const MAX_PTX_ISA: (u32, u32) = (9, 0);

fn main() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let kernels = root.join("kernels");
    let checked_in = kernels.join("ptx");

    for var in ["NVCC", "CUDA_HOME", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for script in ["scripts/setup-cuda", "scripts/gen-ptx"] {
        if root.join(script).exists() {
            println!("cargo:rerun-if-changed={script}");
        }
    }
    // A later `scripts/setup-cuda` rewrites this stamp; missing paths are not
    // declared because cargo would then rerun the script on every build.
    if root.join(".cuda/.installed").exists() {
        println!("cargo:rerun-if-changed=.cuda/.installed");
    }
    for file in list(&kernels).into_iter().chain(list(&checked_in)) {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let sources: Vec<PathBuf> = list(&kernels)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    if sources.is_empty() {
        panic!("no kernels/*.cu found in {}", kernels.display());
    }
    let stems: Vec<String> = sources.iter().map(|p| stem(p)).collect();

    let source = match find_nvcc(&root) {
        Some(nvcc) => match compile_all(&nvcc, &kernels, &sources, &out) {
            Ok(release) => {
                for s in &stems {
                    warn_if_stale(
                        &out.join(format!("{s}.ptx")),
                        &checked_in.join(format!("{s}.ptx")),
                    );
                }
                format!("nvcc {} {release}", nvcc.display())
            }
            Err(too_new) => {
                println!("cargo:warning={too_new}; embedding the checked-in kernels/ptx instead");
                copy_checked_in(&checked_in, &stems, &out);
                "checked-in kernels/ptx".to_string()
            }
        },
        None => {
            copy_checked_in(&checked_in, &stems, &out);
            "checked-in kernels/ptx".to_string()
        }
    };
    println!("cargo:rustc-env=LS_PTX_SOURCE={source}");
    write_module_table(&out, &stems);
}

/// The regular files directly inside `dir`, sorted; empty if `dir` is missing.
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_else(|| panic!("kernel file name is not UTF-8: {}", p.display()))
        .to_string()
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(explicit) = env::var_os("NVCC") {
        let p = PathBuf::from(explicit);
        if !p.is_file() {
            panic!("NVCC={} does not name a file", p.display());
        }
        return Some(p);
    }
    let mut candidates = Vec::new();
    if let Some(home) = env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("bin/nvcc"));
    }
    candidates.push(root.join(".cuda/bin/nvcc"));
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    let found = candidates.into_iter().find(|p| p.is_file())?;
    println!("cargo:rerun-if-changed={}", found.display());
    Some(found)
}

/// Compiles every source; returns nvcc's release line, or `Err(reason)` when
/// its PTX is too new for the drivers we support. A failing nvcc is a build error.
fn compile_all(
    nvcc: &Path,
    kernels: &Path,
    sources: &[PathBuf],
    out: &Path,
) -> Result<String, String> {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", nvcc.display()));
    if !version.status.success() {
        panic!(
            "{} --version failed: {}",
            nvcc.display(),
            String::from_utf8_lossy(&version.stderr)
        );
    }
    let release = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| "(unknown release)".to_string());

    let flags_file = kernels.join("nvcc.flags");
    let flags = fs::read_to_string(&flags_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", flags_file.display()));
    for src in sources {
        let dst = out.join(format!("{}.ptx", stem(src)));
        let name = src.file_name().expect("source has a file name");
        // Run inside kernels/ with a bare file name so the output does not depend
        // on where the repository is checked out.
        let status = Command::new(nvcc)
            .current_dir(kernels)
            .args(flags.split_whitespace())
            .arg(name)
            .arg("-o")
            .arg(&dst)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        if !status.success() {
            panic!(
                "{} failed on kernels/{} ({status})",
                nvcc.display(),
                name.to_string_lossy()
            );
        }
        let ptx =
            fs::read_to_string(&dst).unwrap_or_else(|e| panic!("reading {}: {e}", dst.display()));
        match ptx_isa(&ptx) {
            Some(isa) if isa <= MAX_PTX_ISA => {}
            Some((major, minor)) => {
                return Err(format!(
                    "{} ({release}) writes PTX ISA {major}.{minor}, newer than {}.{} which 580-series drivers accept",
                    nvcc.display(),
                    MAX_PTX_ISA.0,
                    MAX_PTX_ISA.1
                ))
            }
            None => panic!("{} has no .version directive", dst.display()),
        }
    }
    Ok(release)
}

/// The `.version major.minor` directive of a PTX text.
fn ptx_isa(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))?;
    let (major, minor) = line.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The "// Cuda compilation tools, release ..." header line of a PTX text.
fn compiler_line(ptx: &str) -> Option<&str> {
    ptx.lines()
        .find(|l| l.starts_with("//") && l.contains("release"))
}

/// Warns when a compiler of the same release as the checked-in PTX's produced
/// something else: the checked-in file is stale. (Other releases legitimately
/// produce other PTX.)
fn warn_if_stale(built: &Path, checked: &Path) {
    let built_ptx = fs::read_to_string(built).unwrap_or_default();
    let Ok(checked_ptx) = fs::read_to_string(checked) else {
        println!(
            "cargo:warning={} is missing; run scripts/gen-ptx and commit it",
            checked.display()
        );
        return;
    };
    if compiler_line(&built_ptx) == compiler_line(&checked_ptx) && built_ptx != checked_ptx {
        println!(
            "cargo:warning={} is stale (nvcc output differs); run scripts/gen-ptx and commit it",
            checked.display()
        );
    }
}

fn copy_checked_in(checked_in: &Path, stems: &[String], out: &Path) {
    for s in stems {
        let from = checked_in.join(format!("{s}.ptx"));
        let to = out.join(format!("{s}.ptx"));
        fs::copy(&from, &to).unwrap_or_else(|e| {
            panic!(
                "no nvcc found and {} cannot be copied ({e}); run scripts/gen-ptx to create it",
                from.display()
            )
        });
    }
}

/// Writes `ptx_modules.rs`: the table of every module's name and PTX text.
fn write_module_table(out: &Path, stems: &[String]) {
    let mut table = String::from(
        "/// Every PTX module built from `kernels/*.cu`: (file stem, PTX text).\n\
         pub const PTX_MODULES: &[(&str, &str)] = &[\n",
    );
    for s in stems {
        let path = out.join(format!("{s}.ptx"));
        table.push_str(&format!(
            "    ({s:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    table.push_str("];\n");
    let dst = out.join("ptx_modules.rs");
    fs::write(&dst, table).unwrap_or_else(|e| panic!("writing {}: {e}", dst.display()));
}
