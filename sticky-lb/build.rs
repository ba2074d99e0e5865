//! Embeds the XDP object into the controller. `./x build` (xtask) compiles sticky-lb-ebpf with its
//! pinned nightly first; this script only points the compiler at the result.

use std::path::PathBuf;

fn main() {
    let object = std::env::var_os("STICKY_LB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Read at run time, not with env!(): a build script compiled in another checkout
            // (a target directory copied from it) would otherwise embed that checkout's object.
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../target/ebpf/bpfel-unknown-none/release/sticky-lb")
        });
    println!("cargo:rerun-if-env-changed=STICKY_LB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the XDP object {} is missing: build with `./x build` (it compiles sticky-lb-ebpf first)",
            object.display()
        );
    }
    println!(
        "cargo:rustc-env=STICKY_LB_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
