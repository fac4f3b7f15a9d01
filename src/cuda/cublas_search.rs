//! Where cuBLAS is looked for, in order, without running any program:
//!
//! 1. `$LS_CUBLAS_PATH`: the library file, or a directory holding it;
//! 2. the dynamic loader's own search (`LD_LIBRARY_PATH`, `ld.so.cache`, the
//!    system directories), by soname: `libcublas.so.13`, then `.12`;
//! 3. the CUDA toolkit: `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
//!    `/usr/local/cuda/lib64`;
//! 4. only when asked, the `nvidia` pip packages (PyTorch installs cuBLAS
//!    as `nvidia/cu13/lib` or `nvidia/cublas/lib`) in the site-packages
//!    directories given to [`add_site_packages`] or named by
//!    `$LS_CUBLAS_PIP` (`:`-separated), or with `LS_CUBLAS_PIP=1` those of
//!    the active Python environment: `$VIRTUAL_ENV`, `$CONDA_PREFIX` and the
//!    prefix of the first `python3` on `$PATH`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The sonames tried in each directory, newest first.
pub(super) const SONAMES: &[&str] = &["libcublas.so.13", "libcublas.so.12"];

/// One place to try: a path, or a bare soname for the dynamic loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    /// What to open.
    pub(super) path: PathBuf,
    /// Which step of the search it comes from.
    pub(super) origin: &'static str,
}

static SITE_PACKAGES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Adds a Python site-packages directory whose `nvidia` pip packages are
/// searched for cuBLAS (step 4 of the module's list), e.g. by a Python
/// binding with its own interpreter's site-packages. Takes effect if called
/// before cuBLAS is first loaded (the first [`Cublas::new`](super::cublas::Cublas::new),
/// [`is_available`](super::cublas::is_available) or
/// [`library_path`](super::cublas::library_path)).
pub fn add_site_packages(dir: impl Into<PathBuf>) {
    let mut dirs = SITE_PACKAGES.lock().unwrap_or_else(|e| e.into_inner());
    let dir = dir.into();
    if !dirs.contains(&dir) {
        dirs.push(dir);
    }
}

/// The directories given to [`add_site_packages`].
pub(super) fn registered_site_packages() -> Vec<PathBuf> {
    SITE_PACKAGES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Every candidate, in search order, for the environment `env` (a lookup
/// such as `std::env::var_os`) and the registered site-packages.
pub(super) fn candidates(
    env: &dyn Fn(&str) -> Option<OsString>,
    site_packages: &[PathBuf],
) -> Vec<Candidate> {
    let mut out = Vec::new();
    let in_dir = |dir: &Path, origin, out: &mut Vec<Candidate>| {
        for s in SONAMES {
            out.push(Candidate {
                path: dir.join(s),
                origin,
            });
        }
    };
    if let Some(p) = env("LS_CUBLAS_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_dir() {
            in_dir(&p, "LS_CUBLAS_PATH", &mut out);
        } else {
            out.push(Candidate {
                path: p,
                origin: "LS_CUBLAS_PATH",
            });
        }
    }
    for s in SONAMES {
        out.push(Candidate {
            path: PathBuf::from(s),
            origin: "the dynamic loader's path",
        });
    }
    for dir in toolkit_dirs(env) {
        in_dir(&dir, "the CUDA toolkit", &mut out);
    }
    for sp in pip_site_packages(env, site_packages) {
        for pkg in ["cu13", "cublas"] {
            in_dir(
                &sp.join("nvidia").join(pkg).join("lib"),
                "pip packages",
                &mut out,
            );
        }
    }
    out
}

/// `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`.
fn toolkit_dirs(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(|k| env(k).filter(|v| !v.is_empty()))
        .map(|v| PathBuf::from(v).join("lib64"))
        .collect();
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.dedup();
    dirs
}

/// The site-packages directories whose `nvidia` packages are searched:
/// none unless registered or asked for with `LS_CUBLAS_PIP`.
fn pip_site_packages(
    env: &dyn Fn(&str) -> Option<OsString>,
    registered: &[PathBuf],
) -> Vec<PathBuf> {
    let mut out = registered.to_vec();
    let Some(pip) = env("LS_CUBLAS_PIP").filter(|v| !v.is_empty() && v != "0") else {
        return out;
    };
    if pip == "1" {
        for prefix in python_prefixes(env) {
            out.extend(prefix_site_packages(&prefix));
        }
    } else {
        out.extend(std::env::split_paths(&pip));
    }
    out
}

/// `$VIRTUAL_ENV`, `$CONDA_PREFIX` and the parent of the directory of the
/// first `python3` on `$PATH` (not following links, so that a virtualenv's
/// `bin/python3` gives the virtualenv).
fn python_prefixes(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .into_iter()
        .filter_map(|k| env(k).filter(|v| !v.is_empty()))
        .map(PathBuf::from)
        .collect();
    if let Some(path) = env("PATH") {
        let python = std::env::split_paths(&path)
            .map(|d| d.join("python3"))
            .find(|p| p.is_file());
        if let Some(prefix) = python
            .as_deref()
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            out.push(prefix.to_path_buf());
        }
    }
    out.dedup();
    out
}

/// `PREFIX/lib/python3*/{site,dist}-packages` and `PREFIX/lib/python3/dist-packages`.
fn prefix_site_packages(prefix: &Path) -> Vec<PathBuf> {
    let lib = prefix.join("lib");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .iter()
        .flat_map(|v| [v.join("site-packages"), v.join("dist-packages")])
        .filter(|p| p.is_dir())
        .collect()
}

/// The error when no candidate loaded: every place searched, why each
/// existing file failed, and how to point at the library.
pub(super) fn not_found(cands: &[Candidate], failures: &[String]) -> String {
    let mut places: Vec<String> = Vec::new();
    for c in cands {
        let dir = match c.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => format!("{} ({})", d.display(), c.origin),
            None => format!("{} ({})", c.path.display(), c.origin),
        };
        if !places.contains(&dir) {
            places.push(dir);
        }
    }
    let mut msg = format!(
        "cuBLAS ({}) could not be loaded. Searched: {}. Point at it with \
         LS_CUBLAS_PATH=<libcublas.so.N or its directory>, LD_LIBRARY_PATH or CUDA_HOME; \
         for the nvidia pip packages (PyTorch's), set LS_CUBLAS_PIP=1 (the active Python \
         environment) or LS_CUBLAS_PIP=<site-packages directory>",
        SONAMES.join(" or "),
        places.join(", ")
    );
    if !failures.is_empty() {
        msg.push_str(". Failures: ");
        msg.push_str(&failures.join("; "));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn paths(c: &[Candidate]) -> Vec<String> {
        c.iter().map(|c| c.path.display().to_string()).collect()
    }

    #[test]
    fn order_is_override_loader_toolkit_and_pip_only_when_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap();
        let env = env_of(&[("LS_CUBLAS_PATH", dir), ("CUDA_HOME", "/opt/cuda-x")]);
        let got = paths(&candidates(&env, &[]));
        let want = vec![
            format!("{dir}/libcublas.so.13"),
            format!("{dir}/libcublas.so.12"),
            "libcublas.so.13".into(),
            "libcublas.so.12".into(),
            "/opt/cuda-x/lib64/libcublas.so.13".into(),
            "/opt/cuda-x/lib64/libcublas.so.12".into(),
            "/usr/local/cuda/lib64/libcublas.so.13".into(),
            "/usr/local/cuda/lib64/libcublas.so.12".into(),
        ];
        assert_eq!(got, want);
        // A file is taken as is.
        let env = env_of(&[("LS_CUBLAS_PATH", "/x/libcublas.so.12")]);
        assert_eq!(paths(&candidates(&env, &[]))[0], "/x/libcublas.so.12");
        // No pip package is searched unless asked, even with a virtualenv active.
        let env = env_of(&[("VIRTUAL_ENV", dir)]);
        assert!(candidates(&env, &[])
            .iter()
            .all(|c| c.origin != "pip packages"));
    }

    #[test]
    fn pip_packages_come_from_the_given_or_active_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let venv = tmp.path().join("venv");
        let sp = venv.join("lib/python3.12/site-packages");
        std::fs::create_dir_all(&sp).unwrap();
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::write(venv.join("bin/python3"), "").unwrap();
        let pip = |c: Vec<Candidate>| -> Vec<String> {
            paths(
                &c.into_iter()
                    .filter(|c| c.origin == "pip packages")
                    .collect::<Vec<_>>(),
            )
        };
        let want = |sp: &Path| -> Vec<String> {
            ["cu13", "cublas"]
                .iter()
                .flat_map(|p| SONAMES.iter().map(move |s| (p, s)))
                .map(|(p, s)| {
                    sp.join("nvidia")
                        .join(p)
                        .join("lib")
                        .join(s)
                        .display()
                        .to_string()
                })
                .collect()
        };
        // LS_CUBLAS_PIP=1: the python3 on PATH's prefix.
        let bin = venv.join("bin");
        let env = env_of(&[("LS_CUBLAS_PIP", "1"), ("PATH", bin.to_str().unwrap())]);
        assert_eq!(pip(candidates(&env, &[])), want(&sp));
        // A directory named outright, and one registered by a binding.
        let env = env_of(&[("LS_CUBLAS_PIP", "/some/site-packages")]);
        assert_eq!(
            pip(candidates(&env, &[])),
            want(Path::new("/some/site-packages"))
        );
        assert_eq!(
            pip(candidates(&env_of(&[]), std::slice::from_ref(&sp))),
            want(&sp)
        );
    }

    #[test]
    fn the_error_names_every_place_and_how_to_point_at_it() {
        let env = env_of(&[
            ("LS_CUBLAS_PATH", "/x/libcublas.so.13"),
            ("LS_CUBLAS_PIP", "/sp"),
        ]);
        let cands = candidates(&env, &[]);
        let msg = not_found(&cands, &["/x/libcublas.so.13: bad ELF".into()]);
        for w in [
            "/x (LS_CUBLAS_PATH)",
            "libcublas.so.13 (the dynamic loader's path)",
            "/usr/local/cuda/lib64 (the CUDA toolkit)",
            "/sp/nvidia/cu13/lib (pip packages)",
            "/sp/nvidia/cublas/lib (pip packages)",
            "LS_CUBLAS_PATH=",
            "LD_LIBRARY_PATH",
            "CUDA_HOME",
            "LS_CUBLAS_PIP=1",
            "bad ELF",
        ] {
            assert!(msg.contains(w), "{w:?} missing from: {msg}");
        }
    }
}
