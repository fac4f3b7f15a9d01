//! The embedded PTX loads on the drivers we support and defines every kernel.

use std::path::Path;

use layer_streamer::kernels::{KERNEL_NAMES, PTX, PTX_MODULES, PTX_SOURCE};

/// `.version major.minor` of a PTX text.
fn isa(ptx: &str) -> (u32, u32) {
    let v = ptx
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))
        .expect("PTX has a .version directive");
    let (major, minor) = v.trim().split_once('.').expect("version is major.minor");
    (major.parse().unwrap(), minor.parse().unwrap())
}

fn target(ptx: &str) -> &str {
    ptx.lines()
        .find_map(|l| l.trim().strip_prefix(".target "))
        .expect("PTX has a .target directive")
        .trim()
}

fn assert_loadable(name: &str, ptx: &str) {
    assert!(
        isa(ptx) <= (9, 0),
        "{name}: PTX ISA {:?} is newer than 9.0 (CUDA 13.0), which 580-series drivers reject",
        isa(ptx)
    );
    assert_eq!(target(ptx), "sm_80", "{name}: unexpected .target");
    assert!(ptx.contains(".address_size 64"), "{name}: not 64-bit PTX");
}

fn assert_entries(name: &str, ptx: &str) {
    for k in KERNEL_NAMES {
        assert!(
            ptx.contains(&format!(".visible .entry {k}(")),
            "{name}: no entry point {k}"
        );
    }
}

#[test]
fn embedded_ptx_targets_supported_drivers_and_has_every_kernel() {
    eprintln!("embedded PTX from: {PTX_SOURCE}");
    assert_loadable("embedded kernels.ptx", PTX);
    assert_entries("embedded kernels.ptx", PTX);
    let (_, table_ptx) = PTX_MODULES
        .iter()
        .find(|(n, _)| *n == "kernels")
        .expect("PTX_MODULES lists kernels");
    assert_eq!(*table_ptx, PTX);
    for (name, ptx) in PTX_MODULES {
        assert_loadable(name, ptx);
    }
}

#[test]
fn every_kernel_source_has_checked_in_ptx() {
    let dir = Path::new("kernels").to_path_buf();
    let mut sources = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("cu") {
            continue;
        }
        sources += 1;
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let checked = dir.join("ptx").join(format!("{stem}.ptx"));
        let text = std::fs::read_to_string(&checked)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/gen-ptx)", checked.display()));
        assert_loadable(&checked.display().to_string(), &text);
        assert!(
            PTX_MODULES.iter().any(|(n, _)| *n == stem),
            "{stem} is not embedded"
        );
    }
    assert_eq!(sources, PTX_MODULES.len());
}

#[test]
fn checked_in_ptx_has_every_kernel_and_matches_the_embedded_one_when_used() {
    let path = Path::new("kernels/ptx/kernels.ptx").to_path_buf();
    let checked = std::fs::read_to_string(&path).unwrap();
    assert_entries("kernels/ptx/kernels.ptx", &checked);
    // The checked-in PTX is what the pinned compiler writes; when that compiler
    // built the embedded PTX, the two must agree (else run scripts/gen-ptx).
    if PTX_SOURCE.starts_with("checked-in") || PTX_SOURCE.contains("V13.0.88") {
        assert!(checked == PTX, "kernels/ptx/kernels.ptx differs from the embedded PTX ({PTX_SOURCE}); run scripts/gen-ptx");
    }
}
