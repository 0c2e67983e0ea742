//! Bakes a digest of the crate's own sources into the library as `FLOWMAP_SOURCE_DIGEST`, so a
//! test can tell an extension built from older sources (tests/dp/test_native_build.py computes
//! the same digest of the files on disk). std only: a build script's dependencies would be built
//! and fetched for every build of the extension.
//!
//! The sources: Cargo.toml, Cargo.lock, this file, and every file under src/ (the Makefile
//! rebuilds the extension when one of them changes). The digest: 64-bit FNV-1a over each file in
//! the byte order of its path relative to the crate, as `path NUL length NUL contents`; printed
//! as 16 lowercase hex digits.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const FILES: [&str; 3] = ["Cargo.toml", "Cargo.lock", "build.rs"];

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let mut paths: Vec<String> = FILES.iter().map(|f| f.to_string()).collect();
    under(&crate_dir, Path::new("src"), &mut paths);
    paths.sort();
    let mut digest = Fnv1a::new();
    for path in &paths {
        let contents = fs::read(crate_dir.join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        digest.update(path.as_bytes());
        digest.update(b"\0");
        digest.update(contents.len().to_string().as_bytes());
        digest.update(b"\0");
        digest.update(&contents);
    }
    println!("cargo:rustc-env=FLOWMAP_SOURCE_DIGEST={:016x}", digest.0);
    for path in FILES.iter().chain(["src"].iter()) {
        println!("cargo:rerun-if-changed={path}"); // a folder: any file in it, added ones too
    }
}

/// Every file under `dir` (relative to `root`), as a path with `/` separators.
fn under(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let entries = fs::read_dir(root.join(dir)).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("a folder entry");
        let rel = dir.join(entry.file_name());
        let kind = entry.file_type().expect("a file type");
        if kind.is_dir() {
            under(root, &rel, out);
        } else if kind.is_file() {
            let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            out.push(parts.join("/"));
        }
    }
}

struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
